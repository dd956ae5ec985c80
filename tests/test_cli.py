"""End to end through the real scripts on a tiny BERT: word_freq -> train -> predict -> compute_elbo
-> compute_metric, exact resume, and one clear error line for bad input."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import ROOT, one_error_line, run_cli, run_here, run_together, train_args


def records(run_dir, split):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_word_freq_counts(lm_word_freq, tiny_corpus, tok):
    _, wf = lm_word_freq
    rec = json.load(open(wf))
    assert len(rec["counts"]) == 30522 and rec["vocab_size"] == 30522
    # what the schedule noises, as DiffusionBERT's word_freq.py counts it: add_special_tokens=False
    expected = [0] * 30522
    for line in open(os.path.join(tiny_corpus, "train.txt"), encoding="utf-8"):
        if line.strip():
            for i in tok(line.rstrip("\n"), add_special_tokens=False)["input_ids"]:
                expected[i] += 1
    assert rec["counts"] == expected
    assert rec["counts"][101] == rec["counts"][102] == rec["counts"][103] == 0 and rec["excluded_ids"] == [101, 102]
    assert rec["num_tokens"] == sum(expected) and rec["format"] == "diffusion-word-freq-v2"


def test_word_freq_v1_files_still_load_and_are_flagged(lm_word_freq, tmp_path):
    from textdata import word_freq
    _, wf = lm_word_freq
    old = json.load(open(wf))
    old["format"] = "diffusion-word-freq-v1"
    del old["excluded_ids"]
    json.dump(old, open(tmp_path / "v1.json", "w"))
    assert word_freq.load(str(tmp_path / "v1.json"), vocab_size=30522)["counts"] == old["counts"]
    assert not word_freq.is_current(str(tmp_path / "v1.json")) and word_freq.is_current(str(wf))
    assert not word_freq.is_current(str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_train_writes_checkpoints_and_logs(lm_run):
    _, _, run, proc = lm_run
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4]
    assert [r["step"] for r in records(run, "dev")] == [2, 4]
    for r in records(run, "train"):
        assert all(k in r for k in ("loss", "lr", "tokens_per_s")) and r["loss"] > 0
    for name in ("best", "last"):
        d = run / "checkpoints" / name
        for f in ("run_config.json", "config.json", "model.safetensors", "word_freq.json", "tokenizer.json",
                  "README.md"):
            assert (d / f).is_file(), f"{name}/{f} missing"
    # what --resume reads is in last/ only (--save_training_state last, the default)
    assert (run / "checkpoints" / "last" / "training_state.pt").is_file()
    assert not (run / "checkpoints" / "best" / "training_state.pt").exists()
    info = json.load(open(run / "checkpoints" / "last" / "run_config.json"))
    assert info["step"] == 4 and info["derived"]["word_freq"]["sha256"]
    assert info["config"]["schedule"] == "spindle" and info["derived"]["mask_id"] == 103
    from safetensors.torch import load_file
    assert not any(k.startswith("module.") for k in load_file(run / "checkpoints" / "last" / "model.safetensors"))
    assert "it/s" in proc.stdout or "s/it" in proc.stdout  # the tqdm bar


@pytest.mark.slow
def test_predict_elbo_metric(lm_run, tiny_corpus, tmp_path):
    _, _, run, _ = lm_run
    cwd = tmp_path
    gen = cwd / "gen"
    common = ["predict.py", "--checkpoint", str(run), "--num_samples", "6", "--steps", "16", "--batch_size", "4",
              "--seed", "7", "--out_dir", str(gen)]
    elbo_args = ["compute_elbo.py", "--checkpoint", str(run), "--num_examples", "12", "--eval_steps", "4", "--seed", "3"]
    for i in range(2):  # each its own working directory, hence datasets cache: they run side by side
        (cwd / f"e{i}").mkdir()
    out, _, _, *elbo = run_together(
        lambda: run_cli(*common, "--name", "a", cwd=str(cwd)),
        lambda: run_cli(*common, "--name", "b", cwd=str(cwd)),
        lambda: run_cli(*common, "--name", "c", "--no_cache", cwd=str(cwd)),
        *(lambda i=i: run_cli(*elbo_args, "--out", str(cwd / f"elbo{i}.json"), cwd=str(cwd / f"e{i}"))
          for i in range(2)))
    assert "network calls" in out.stdout
    a, b, c = ((gen / f"{n}.txt").read_text().splitlines() for n in "abc")
    assert len(a) == 6 and a == b == c  # same seed, same samples; the cache changes nothing
    assert not any("[MASK]" in line for line in a)
    meta_a, meta_c = (json.load(open(gen / f"{n}.json")) for n in "ac")
    assert meta_a["row_evaluations"] <= meta_c["row_evaluations"]

    r0, r1 = (json.load(open(cwd / f"elbo{i}.json")) for i in range(2))
    assert r0["nll_bound"] == r1["nll_bound"]  # seeded: repeatable
    assert r0["ppl_word"] > r0["ppl_token"] > 1.0 and r0["num_examples"] == 12
    assert elbo[0].returncode == 0

    before = (gen / "a.txt").read_text()
    m = cwd / "m.json"
    again, _ = run_together(  # the refusal finds a.txt, compute_metric reads it: neither writes it
        lambda: run_cli(*common, "--name", "a", cwd=str(cwd), check=False),
        lambda: run_cli("compute_metric.py", "--samples", str(gen / "a.txt"), "--references",
                        os.path.join(tiny_corpus, "test.txt"), "--tokenizer", str(run / "checkpoints" / "best"),
                        "--out", str(m), cwd=str(cwd)))
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and len(again.stderr.strip().splitlines()) == 1
    assert (gen / "a.txt").read_text() == before

    res = json.load(open(m))["metrics"]
    assert res["num_samples"] == 6
    # oracle: nltk's corpus_bleu per sample against every reference (resp. every other sample), DiffusionBERT's
    # compute_metric.py convention, on references round-tripped through the checkpoint's tokenizer
    from nltk.translate.bleu_score import corpus_bleu
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(run / "checkpoints" / "best"))
    with open(os.path.join(tiny_corpus, "test.txt"), encoding="utf-8") as f:
        refs = [" ".join(tok.decode(tok(line.strip(), add_special_tokens=False)["input_ids"]).split()).split(" ")
                for line in f if line.strip()]
    samples = [line.split(" ") for line in (gen / "a.txt").read_text().splitlines()]
    want_bleu = sum(corpus_bleu([refs], [s]) for s in samples) / len(samples)
    want_self = sum(corpus_bleu([samples[:i] + samples[i + 1:]], [s]) for i, s in enumerate(samples)) / len(samples)
    assert res["bleu"] == pytest.approx(want_bleu, abs=1e-9)
    assert res["self_bleu"] == pytest.approx(want_self, abs=1e-9)


@pytest.mark.slow
def test_predict_released_sampler_fixed_length(lm_run, tmp_path):
    _, _, run, _ = lm_run
    cwd = tmp_path
    gen = cwd / "gen_released"
    common = ["predict.py", "--checkpoint", str(run), "--num_samples", "5", "--steps", "16", "--batch_size", "4",
              "--seed", "3", "--out_dir", str(gen), "--sampler", "released", "--topk", "30", "--temperature", "0.1",
              "--length", "6"]
    run_together(lambda: run_cli(*common, "--name", "a", cwd=str(cwd)),
                 lambda: run_cli(*common, "--name", "b", "--no_cache", cwd=str(cwd)))
    a, b = ((gen / f"{n}.txt").read_text().splitlines() for n in "ab")
    assert len(a) == 5 and a == b and not any("[MASK]" in line for line in a)
    meta = json.load(open(gen / "a.json"))
    assert meta["sampler"] == "released" and meta["length"] == 6
    # training --max_len 32: a --length of 31 is made in blocks (tests/test_semi_ar.py), never wider than a canvas
    p = run_here(*common[:-1], "31", "--block_size", "30", "--name", "c", cwd=str(cwd))
    one_error_line(p, "--block_size", "got 30")


@pytest.mark.slow
def test_released_loss_weighting_is_stored_and_old_configs_are_elbo(lm_run, tiny_bert, tiny_corpus, tmp_path):
    from runtime.config import from_dict
    _, wf, run, _ = lm_run
    info = json.load(open(run / "checkpoints" / "last" / "run_config.json"))
    assert info["config"]["loss_weighting"] == "elbo"
    old = dict(info["config"])
    del old["loss_weighting"]  # a config stored before the flag existed
    assert from_dict(old).loss_weighting == "elbo"
    out = tmp_path / "released"
    run_cli(*train_args(tiny_bert, tiny_corpus, wf, out, max_steps=2, extra=("--loss_weighting", "released")),
            cwd=str(tmp_path))
    assert json.load(open(out / "checkpoints" / "last" / "run_config.json"))["config"]["loss_weighting"] == "released"
    assert all(r["loss"] > 0 for r in records(out, "train"))


@pytest.mark.slow
def test_resume_continues_with_identical_losses(tmp_path, lm_run, tiny_bert, tiny_corpus):
    _, wf, run, _ = lm_run
    part = tmp_path / "part"
    run_cli(*train_args(tiny_bert, tiny_corpus, wf, part, max_steps=2), cwd=str(tmp_path))
    run_cli(*train_args(tiny_bert, tiny_corpus, wf, part, max_steps=4, extra=("--resume", str(part))),
            cwd=str(tmp_path))
    full = {r["step"]: r["loss"] for r in records(run, "train")}
    resumed = {r["step"]: r["loss"] for r in records(part, "train")}
    assert resumed == full  # bitwise on CPU: data order, RNG, optimizer all restored


@pytest.mark.slow
def test_bad_input_gives_one_error_line(tmp_path, lm_run, tiny_bert, tiny_corpus):
    _, wf, run, _ = lm_run
    # spindle without a word-frequency file: the message gives the command that creates it (a real process,
    # the rest run in this process: conftest.run_here)
    p = run_cli(*train_args(tiny_bert, tiny_corpus, tmp_path / "nofreq.json", tmp_path / "r1"), cwd=str(tmp_path), check=False)
    one_error_line(p, "not found", "python word_freq.py")
    # a word-frequency file from another tokenizer
    bad = json.load(open(wf))
    bad["vocab_fingerprint"] = "0" * 16
    bad["tokenizer"] = "other-tokenizer"
    json.dump(bad, open(tmp_path / "other.json", "w"))
    p = run_here(*train_args(tiny_bert, tiny_corpus, tmp_path / "other.json", tmp_path / "r2"), cwd=str(tmp_path))
    one_error_line(p, "other-tokenizer")
    # an existing run directory is not silently reused
    p = run_here(*train_args(tiny_bert, tiny_corpus, wf, run), cwd=str(tmp_path))
    one_error_line(p, "already holds checkpoints")
    # resuming with another config names both sides
    p = run_here(*train_args(tiny_bert, tiny_corpus, wf, run, extra=("--resume", str(run), "--hybrid_lambda", "0.5")),
                 cwd=str(tmp_path))
    one_error_line(p, "--hybrid_lambda", "0.01", "0.5")
    # an empty data file
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.txt").write_text("")
    p = run_here(*train_args(tiny_bert, str(empty), wf, tmp_path / "r3", extra=("--schedule", "mutual")), cwd=str(tmp_path))
    one_error_line(p, "empty")
    # an unknown schedule (argparse rejects it) and --steps beyond T
    p = run_here(*train_args(tiny_bert, tiny_corpus, wf, tmp_path / "r4", extra=("--schedule", "linearish")), cwd=str(tmp_path))
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = run_here("predict.py", "--checkpoint", str(run), "--steps", "65", "--out_dir", str(tmp_path), cwd=str(tmp_path))
    one_error_line(p, "T=64")
    # a checkpoint whose tokenizer does not match the network's vocabulary
    broken = tmp_path / "broken"
    shutil.copytree(run / "checkpoints" / "best", broken)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(broken)
    tok.add_tokens(["zzzextra1", "zzzextra2"])
    tok.save_pretrained(broken)
    p = run_here("predict.py", "--checkpoint", str(broken), "--out_dir", str(tmp_path), cwd=str(tmp_path))
    one_error_line(p, "does not match")
    # a missing checkpoint
    p = run_here("compute_elbo.py", "--checkpoint", str(tmp_path / "nope"), cwd=str(tmp_path))
    one_error_line(p, "does not exist")


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(tmp_path, lm_word_freq, tiny_bert, tiny_corpus):
    """DDP on the CPU: two ranks train together, and only rank 0 prints, logs and writes checkpoints."""
    _, wf = lm_word_freq
    out = tmp_path / "ddp"
    args = train_args(tiny_bert, tiny_corpus, wf, out, max_steps=2, extra=("--accumulation_steps", "2"))
    proc = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.join(ROOT, args[0]), *args[1:], cwd=str(tmp_path))
    assert [r["step"] for r in records(out, "train")] == [1, 2]  # one writer, not two
    assert proc.stdout.count("done: 2 steps") == 1
    assert (out / "checkpoints" / "last" / "model.safetensors").is_file()
    assert sorted(os.listdir(out / "plots")) == ["dev.png", "train_loss.png"] and "could not draw" not in proc.stdout
    import torch
    state = torch.load(out / "checkpoints" / "last" / "training_state.pt", weights_only=False)
    assert len(state["rng"]) == 2  # every rank's RNG is saved for an exact resume


@pytest.mark.slow
def test_torchrun_shards_sampling_and_elbo(tmp_path, lm_run):
    """predict.py and compute_elbo.py under torchrun: the batches are shared out between 2 gloo ranks, and
    rank 0 writes exactly what one process writes (each batch has its own seed)."""
    cwd, _, run, _ = lm_run
    common = ["--checkpoint", str(run), "--num_samples", "7", "--steps", "16", "--batch_size", "2",
              "--seed", "5", "--out_dir", str(tmp_path)]
    elbo = ["--checkpoint", str(run), "--num_examples", "10", "--eval_steps", "4", "--batch_size", "3",
            "--seed", "3"]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    # side by side: sampling, which reads no data, beside the ELBO, which fills the datasets cache of cwd
    run_together(lambda: run_cli("predict.py", *common, "--name", "one", cwd=str(cwd)),
                 lambda: run_cli("compute_elbo.py", *elbo, "--out", str(tmp_path / "elbo1.json"), cwd=str(cwd)))
    proc, _ = run_together(
        lambda: run_cli(*torchrun, os.path.join(ROOT, "predict.py"), *common, "--name", "two", cwd=str(cwd)),
        lambda: run_cli(*torchrun, os.path.join(ROOT, "compute_elbo.py"), *elbo, "--out", str(tmp_path / "elbo2.json"),
                        cwd=str(cwd)))
    assert proc.stdout.count("predict: wrote 7 samples") == 1  # rank 0 alone reports and writes
    one, two = ((tmp_path / f"{n}.txt").read_bytes() for n in ("one", "two"))
    assert one == two and len(one.splitlines()) == 7
    assert json.load(open(tmp_path / "two.json"))["ranks"] == 2
    r1, r2 = (json.load(open(tmp_path / f"elbo{n}.json")) for n in (1, 2))
    assert r1["nll_bound"] == r2["nll_bound"] and r1["tokens"] == r2["tokens"] and r2["ranks"] == 2
    assert sorted(os.listdir(tmp_path)) == ["elbo1.json", "elbo2.json", "one.json", "one.txt", "two.json", "two.txt"]
