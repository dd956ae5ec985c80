"""The released DiffusionBERT settings through the real scripts on a tiny BERT: seq2seq training with
--loss_weighting released and decoding with --sampler released (the run_condition.sh qqp preset's path)."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli, run_here, run_together


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_seq2seq_released_objective_and_sampler(tmp_path, tiny_bert, tiny_pairs):
    run = tmp_path / "run"
    run_cli("train.py", "--task", "seq2seq", "--dataset", "folder", "--data_files", tiny_pairs,
            "--model_name_or_path", tiny_bert, "--num_steps", "40", "--max_len", "48", "--loss_weighting", "released",
            "--hybrid_lambda", "3e-4", "--batch_size", "8", "--max_steps", "2", "--eval_every", "2",
            "--eval_examples", "8", "--eval_steps", "4", "--lr", "1e-3", "--warmup_steps", "0", "--log_every", "1",
            "--out_dir", str(run), "--log_dir", str(tmp_path / "logs"), cwd=str(tmp_path))
    cfg = json.load(open(run / "checkpoints" / "last" / "run_config.json"))["config"]
    assert cfg["loss_weighting"] == "released" and cfg["hybrid_lambda"] == 3e-4
    common = ["predict_downstream_condition.py", "--checkpoint", str(run), "--split", "test", "--sampler", "released",
              "--steps", "10", "--topk", "15", "--mbr_size", "2", "--batch_size", "6", "--seed", "1",
              "--out_dir", str(tmp_path / "gen")]
    (tmp_path / "c").mkdir()  # the second decode's datasets cache: the two run side by side
    run_together(lambda: run_cli(*common, "--name", "a", cwd=str(tmp_path)),
                 lambda: run_cli(*common, "--name", "b", "--no_cache", cwd=str(tmp_path / "c")))
    for s in (1, 2):
        a, b = (read_jsonl(tmp_path / "gen" / n / f"seed{s}.jsonl") for n in "ab")
        assert a == b  # the cache changes nothing
        assert len(a) == 12 and not any("[MASK]" in r["recover"] for r in a)


def test_released_loss_weighting_is_refused_for_the_gaussian_process(tmp_path, tiny_bert, tiny_pairs):
    p = run_here("train.py", "--task", "seq2seq", "--process", "gaussian", "--dataset", "folder", "--data_files",
                 tiny_pairs, "--model_name_or_path", tiny_bert, "--hidden_size", "16", "--num_layers", "1",
                 "--num_heads", "2", "--max_len", "48", "--max_steps", "1", "--loss_weighting", "released",
                 "--out_dir", str(tmp_path / "g"), cwd=str(tmp_path))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[-1].startswith("error:") and "--loss_weighting released" in lines[-1]
    assert "Traceback" not in p.stderr
