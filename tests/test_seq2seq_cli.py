"""Seq2seq end to end through the real scripts on a tiny BERT: train --task seq2seq ->
predict_downstream_condition (MBR) -> compute_metric --mode seq2seq, plus MBR on existing files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import run_cli, run_here, run_together
from evaluation.seq2seq import strip_special
from test_seq2seq_metrics import diffuseq_era_decode, diversityOfSet, get_bleu_e44113d, select_best_index


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_decode_with_mbr_and_metrics(seq2seq_run, tiny_pairs, tok, tmp_path):
    _, run = seq2seq_run
    cwd = tmp_path
    run_cli("predict_downstream_condition.py", "--checkpoint", str(run), "--split", "test", "--steps", "10",
            "--mbr_size", "3", "--batch_size", "5", "--seed", "5", "--name", "dec", "--out_dir", str(cwd / "gen"),
            cwd=str(cwd))
    out = cwd / "gen" / "dec"
    seeds = [read_jsonl(out / f"seed{s}.jsonl") for s in (5, 6, 7)]
    mbr = read_jsonl(out / "mbr.jsonl")
    copy = read_jsonl(out / "copy_source.jsonl")
    with open(os.path.join(tiny_pairs, "test.jsonl"), encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    n = len(pairs)
    assert all(len(rows) == n for rows in seeds) and len(mbr) == n and len(copy) == n

    # DiffuSeq's strings: [CLS] src [SEP] and trg [SEP] (cut to max_len), decoded with BERT's clean-up.
    for pair, row in zip(pairs, copy):
        src, trg = tok.tokenize(pair["src"]), tok.tokenize(pair["trg"])
        assert any(row["source"] == diffuseq_era_decode(["[CLS]"] + src[:k] + ["[SEP]"]) for k in range(len(src) + 1))
        assert any(row["reference"] == diffuseq_era_decode(trg[:k] + ["[SEP]"]) for k in range(len(trg) + 1))
        assert row["recover"] == row["source"]
    assert any("him, saying," in r["reference"] for r in copy)  # the clean-up ran: not "him , saying ,"
    for rows in seeds:
        assert [(r["reference"], r["source"]) for r in rows] == [(r["reference"], r["source"]) for r in copy]
        assert all("[MASK]" not in r["recover"] and not r["recover"].endswith("[PAD]") for r in rows)

    # MBR: DiffuSeq's selectBest (retyped in test_seq2seq_metrics) on the stripped recovers; the row as written.
    picks = [select_best_index([strip_special(rows[i]["recover"]) for rows in seeds]) for i in range(n)]
    assert mbr == [seeds[k][i] for i, k in enumerate(picks)]

    m = cwd / "m.json"
    # three readers of the decode side by side: the metrics of mbr.jsonl, of the folder, and MBR on its own
    run_together(
        lambda: run_cli("compute_metric.py", "--mode", "seq2seq", "--samples", str(out / "mbr.jsonl"),
                        "--bertscore_model", "none", "--out", str(m), cwd=str(cwd)),
        lambda: run_cli("compute_metric.py", "--mode", "seq2seq", "--samples", str(out), "--bertscore_model", "none",
                        cwd=str(cwd)),
        lambda: run_cli("predict_downstream_condition.py", "--mbr_only", *(str(out / f"seed{s}.jsonl") for s in (5, 6, 7)),
                        "--name", "mbr2", "--out_dir", str(cwd / "gen"), cwd=str(cwd)))
    res = json.load(open(m))["metrics"]
    want = np.mean([get_bleu_e44113d(strip_special(r["recover"]), strip_special(r["reference"], pad=False))
                    for r in mbr])
    assert res["bleu"] == float(want)
    # the generation folder itself: its seed*.jsonl files (not decode.json), self-BLEU as DiffuSeq's script
    report = json.load(open(out / "seq2seq_metrics.json"))
    assert [os.path.basename(f) for f in report["inputs"]["files"]] == ["seed5.jsonl", "seed6.jsonl", "seed7.jsonl"]
    cands = [[strip_special(rows[i]["recover"]) for rows in seeds] for i in range(n)]
    assert report["metrics"]["self_bleu"] == float(np.mean([diversityOfSet(c)[0] for c in cands]))

    # the same decode again refuses to overwrite
    p = run_here("predict_downstream_condition.py", "--checkpoint", str(run), "--steps", "10", "--name", "dec",
                 "--out_dir", str(cwd / "gen"), cwd=str(cwd))
    assert p.returncode == 2 and "already exists" in p.stderr

    # MBR on its own over existing files gives the same selection
    assert read_jsonl(cwd / "gen" / "mbr2" / "mbr.jsonl") == mbr


def test_mbr_only_on_files_of_the_old_decoder(tmp_path):
    """Files written before the DiffuSeq strings (no [CLS]/[SEP], ``i ' m``) are read as they are; MBR
    strips [CLS]/[SEP]/[PAD] before comparing, so a [PAD] left in a candidate does not change the choice."""
    old = [["jesus wept .", "the lord ' s word [PAD]", "x"],
           ["jesus wept", "the lord ' s word", "y z"],
           ["[CLS] jesus wept . [SEP] [PAD]", "the lord ' s", "x"]]
    sources = ["src one", "src two", "src three"]
    files = []
    for k, recs in enumerate(old):
        path = tmp_path / f"seed{k}.json"
        src = [f"[CLS] {s} [SEP]" if k == 2 else s for s in sources]  # the sources match once stripped
        path.write_text("".join(json.dumps({"recover": r, "reference": "ref", "source": s}) + "\n"
                                for r, s in zip(recs, src)), encoding="utf-8")
        files.append(str(path))
    run_cli("predict_downstream_condition.py", "--mbr_only", *files, "--name", "m", "--out_dir", str(tmp_path),
            cwd=str(tmp_path))
    got = read_jsonl(tmp_path / "m" / "mbr.jsonl")
    rows = [read_jsonl(f) for f in files]
    picks = [select_best_index([strip_special(r[i]["recover"]) for r in rows]) for i in range(3)]
    assert got == [rows[k][i] for i, k in enumerate(picks)]
    assert picks[0] == 0 and got[1]["recover"] == "the lord ' s word [PAD]"  # a tie: the first, as written


@pytest.mark.slow
def test_spindle_is_off_by_default_for_seq2seq(seq2seq_run):
    _, run = seq2seq_run
    info = json.load(open(run / "checkpoints" / "last" / "run_config.json"))
    assert info["config"]["schedule"] == "mutual" and info["derived"]["word_freq"] is None


@pytest.mark.slow
def test_task_mismatch_is_one_error_line(seq2seq_run, tmp_path):
    _, run = seq2seq_run
    p = run_here("predict.py", "--checkpoint", str(run), "--out_dir", str(tmp_path), cwd=str(tmp_path))
    assert p.returncode == 2 and "seq2seq checkpoint" in p.stderr and "predict_downstream_condition.py" in p.stderr
    p = run_cli("compute_elbo.py", "--checkpoint", str(run), cwd=str(tmp_path), check=False)
    assert p.returncode == 2 and "seq2seq checkpoint" in p.stderr


def test_source_is_never_noised_in_training_batches(tiny_pairs):
    """The seq2seq collator's noise mask covers the target region only; the process never masks the rest."""
    import torch
    from transformers import AutoTokenizer

    from conditional_data import PairCollator, load_pair_splits, tokenize_pairs
    from diffusion import AbsorbingDiffusion, make_schedule
    from common.loading import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    ds = tokenize_pairs(load_pair_splits("folder", tiny_pairs, splits=("valid",), log=lambda *a: None), tok, 48,
                        log=lambda *a: None)
    batch = PairCollator(tok.pad_token_id, canvas_len=48)([ds["valid"][i] for i in range(8)])
    diff = AbsorbingDiffusion(make_schedule("mutual"), 50, tok.mask_token_id)
    x_t = diff.q_sample(batch["input_ids"], torch.full((8,), 50), batch["noise_mask"])
    assert torch.equal(x_t[~batch["noise_mask"]], batch["input_ids"][~batch["noise_mask"]])
    assert bool((x_t[batch["noise_mask"]] == tok.mask_token_id).all())  # t = T masks the whole target
