"""Seq2seq end to end through the real scripts on a tiny BERT: train --task seq2seq ->
predict_downstream_condition (MBR) -> compute_metric --mode seq2seq, plus MBR on existing files."""
from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory, tiny_bert, tiny_pairs):
    cwd = tmp_path_factory.mktemp("cond")
    run = cwd / "run"
    run_cli("train.py", "--task", "seq2seq", "--dataset", "folder", "--data_files", tiny_pairs,
            "--model_name_or_path", tiny_bert, "--num_steps", "50", "--max_len", "48",
            "--batch_size", "8", "--max_steps", "3", "--eval_every", "3", "--eval_examples", "8",
            "--eval_steps", "4", "--lr", "1e-3", "--warmup_steps", "0", "--log_every", "1",
            "--out_dir", str(run), "--log_dir", str(cwd / "logs"), cwd=str(cwd))
    return cwd, run


def test_decode_with_mbr_and_metrics(cond_run, tiny_pairs):
    cwd, run = cond_run
    run_cli("predict_downstream_condition.py", "--checkpoint", str(run), "--split", "test", "--steps", "10",
            "--mbr_size", "3", "--batch_size", "5", "--seed", "5", "--name", "dec", "--out_dir", str(cwd / "gen"),
            cwd=str(cwd))
    out = cwd / "gen" / "dec"
    seeds = [read_jsonl(out / f"seed{s}.jsonl") for s in (5, 6, 7)]
    mbr = read_jsonl(out / "mbr.jsonl")
    copy = read_jsonl(out / "copy_source.jsonl")
    n = sum(1 for _ in open(os.path.join(tiny_pairs, "test.jsonl")))
    assert all(len(rows) == n for rows in seeds) and len(mbr) == n and len(copy) == n
    for i, row in enumerate(mbr):
        assert set(row) == {"recover", "reference", "source"}
        assert row in [s[i] for s in seeds]  # MBR picks one of the candidates
        assert "[MASK]" not in row["recover"] and "[CLS]" not in row["recover"]
        assert row["source"] == copy[i]["source"] == copy[i]["recover"]
    # the source text survives the round trip (it was never noised)
    first_src = json.loads(open(os.path.join(tiny_pairs, "test.jsonl")).readline())["src"]
    assert copy[0]["source"].split()[:3] == first_src.lower().split()[:3]

    m = cwd / "m.json"
    run_cli("compute_metric.py", "--mode", "seq2seq", "--samples", str(out / "mbr.jsonl"), "--bertscore_model",
            "none", "--out", str(m), cwd=str(cwd))
    res = json.load(open(m))["metrics"]
    assert 0.0 <= res["bleu"] <= 1.0
    # the same decode again refuses to overwrite
    p = run_cli("predict_downstream_condition.py", "--checkpoint", str(run), "--steps", "10", "--name", "dec",
                "--out_dir", str(cwd / "gen"), cwd=str(cwd), check=False)
    assert p.returncode == 2 and "already exists" in p.stderr

    # MBR on its own over existing files gives the same selection
    run_cli("predict_downstream_condition.py", "--mbr_only", *(str(out / f"seed{s}.jsonl") for s in (5, 6, 7)),
            "--name", "mbr2", "--out_dir", str(cwd / "gen"), cwd=str(cwd))
    assert read_jsonl(cwd / "gen" / "mbr2" / "mbr.jsonl") == mbr


def test_spindle_is_off_by_default_for_seq2seq(cond_run):
    _, run = cond_run
    info = json.load(open(run / "checkpoints" / "last" / "run_config.json"))
    assert info["config"]["schedule"] == "mutual" and info["derived"]["word_freq"] is None


def test_task_mismatch_is_one_error_line(cond_run, tmp_path):
    cwd, run = cond_run
    p = run_cli("predict.py", "--checkpoint", str(run), "--out_dir", str(tmp_path), cwd=str(tmp_path), check=False)
    assert p.returncode == 2 and "seq2seq checkpoint" in p.stderr and "predict_downstream_condition.py" in p.stderr
    p = run_cli("compute_elbo.py", "--checkpoint", str(run), cwd=str(tmp_path), check=False)
    assert p.returncode == 2 and "seq2seq checkpoint" in p.stderr


def test_source_is_never_noised_in_training_batches(tiny_pairs):
    """The seq2seq collator's noise mask covers the target region only; the process never masks the rest."""
    import torch
    from transformers import AutoTokenizer

    from conditional_data import PairCollator, load_pair_splits, tokenize_pairs
    from diffusion import AbsorbingDiffusion, make_schedule
    from models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    ds = tokenize_pairs(load_pair_splits("folder", tiny_pairs, splits=("valid",), log=lambda *a: None), tok, 48,
                        log=lambda *a: None)
    batch = PairCollator(tok.pad_token_id, canvas_len=48)([ds["valid"][i] for i in range(8)])
    diff = AbsorbingDiffusion(make_schedule("mutual"), 50, tok.mask_token_id)
    x_t = diff.q_sample(batch["input_ids"], torch.full((8,), 50), batch["noise_mask"])
    assert torch.equal(x_t[~batch["noise_mask"]], batch["input_ids"][~batch["noise_mask"]])
    assert bool((x_t[batch["noise_mask"]] == tok.mask_token_id).all())  # t = T masks the whole target
