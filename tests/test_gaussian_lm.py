"""The Gaussian process on the LM task (Diffusion-LM): the canvas rows, training through the real CLI, an
exact resume, post-training, and the flags that must give one error line. Tiny transformer, CPU."""
from __future__ import annotations

import json
import os

import pytest
import torch

from common.errors import UserError
from conftest import assert_resume_is_exact, gauss_args, one_error_line, run_cli, run_here, train_losses
from runtime.config import TrainConfig
from textdata import lm

CLS, SEP, PAD = 101, 102, 0


def test_canvas_rows_noise_everything_but_cls():
    rows = [{"input_ids": [CLS, 7, 8, SEP], "n_words": 2},
            {"input_ids": [CLS, 9, SEP], "n_words": 1},
            {"input_ids": [CLS, 4, 5, 6, 7, SEP], "n_words": 3}]  # fills the canvas: no padding
    batch = lm.CanvasCollator(PAD, canvas_len=6)(rows)
    assert torch.equal(batch["input_ids"], torch.tensor([[CLS, 7, 8, SEP, PAD, PAD],
                                                         [CLS, 9, SEP, PAD, PAD, PAD],
                                                         [CLS, 4, 5, 6, 7, SEP]]))
    F, T = False, True
    assert torch.equal(batch["noise_mask"], torch.tensor([[F, T, T, T, T, T]] * 3))  # [SEP] and [PAD] generated
    assert torch.equal(batch["attention_mask"], torch.ones(3, 6, dtype=torch.long))
    assert torch.equal(batch["n_words"], torch.tensor([2, 1, 3]))
    with pytest.raises(UserError, match="does not fit the canvas of 5"):
        lm.CanvasCollator(PAD, canvas_len=5)(rows)


def test_the_gaussian_lm_task_batches_on_the_canvas(tok, tiny_corpus, private_hf_cache):
    from runtime.assemble import load_task_data
    cfg = TrainConfig(task="lm", process="gaussian", dataset="text", data_files=tiny_corpus, max_len=16)
    data, collate = load_task_data(cfg, tok, ("valid",), log=lambda *a, **k: None)
    assert collate == lm.CanvasCollator(tok.pad_token_id, 16)
    rows = [data["valid"][i] for i in range(4)]
    batch = collate(rows)
    assert batch["input_ids"].shape == (4, 16) and not batch["noise_mask"][:, 0].any()
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()
    assert (batch["input_ids"] == tok.sep_token_id).sum(1).tolist() == [1] * 4  # every line ends in [SEP]
    # the absorbing LM keeps its dynamic padding, with [CLS]/[SEP] never noised
    _, absorbing = load_task_data(TrainConfig(task="lm", dataset="text", data_files=tiny_corpus, max_len=16), tok,
                                  ("valid",), log=lambda *a, **k: None)
    assert isinstance(absorbing, lm.Collator)


def lm_args(tiny_bert, tiny_corpus, out, max_steps=4, extra=(), T=100):
    return gauss_args(tiny_bert, tiny_corpus, out, max_steps=max_steps, extra=extra, T=T, task="lm")


@pytest.mark.slow
def test_a_gaussian_lm_trains_through_the_cli(gauss_lm_run, tiny_corpus):
    cwd, run = gauss_lm_run
    last = run / "checkpoints" / "last"
    info = json.load(open(last / "run_config.json"))
    c = info["config"]
    assert (c["task"], c["process"], c["schedule"], c["loss_average"]) == ("lm", "gaussian", "sqrt", "all")
    # the length histogram the sampler draws from: every training line, by its number of words between [CLS]/[SEP]
    counts = info["derived"]["length_counts"]
    assert len(counts) == c["max_len"] - 1 and sum(counts) == sum(1 for _ in open(f"{tiny_corpus}/train.txt"))
    assert (last / "denoiser_ema.safetensors").is_file()
    ts = torch.load(last / "training_state.pt", weights_only=False)
    assert ts["ema_updates"] == 4 and int(ts["timestep_sampler"]["count"].sum()) == 4 * 8
    dev = [json.loads(line) for line in open(run / "metrics.jsonl") if '"dev"' in line]
    assert [r["step"] for r in dev] == [2, 4] and all(r["loss"] > 0 for r in dev)
    card = (last / "README.md").read_text(encoding="utf-8")
    assert "(Diffusion-LM), T = 100" in card and "# Diffusion-LM checkpoint" in card
    rel = os.path.relpath(last, cwd)  # the card's paths are relative to where train.py ran
    assert f"python predict.py --checkpoint {rel} --decode_respacing uniform_100\n" in card
    assert f"python compute_elbo.py --checkpoint {rel}\n" in card
    assert "library_name: pytorch" in card and not (last / "config.json").exists()  # not a transformers model


@pytest.mark.slow
def test_resume_is_exact(tmp_path, tiny_bert, tiny_corpus):
    # T = 4: the lossaware sampler is half warm at the checkpoint, as in the seq2seq test
    assert_resume_is_exact(tmp_path, lambda out, n, extra: lm_args(tiny_bert, tiny_corpus, out, max_steps=n, T=4,
                                                                   extra=("--save_every", "4", *extra)))


@pytest.mark.slow
def test_post_train_runs_on_a_gaussian_lm_checkpoint(gauss_lm_run, tmp_path):
    _, run = gauss_lm_run
    post = tmp_path / "post"
    run_cli("train.py", "--post_train", str(run), "--simi_penalty", "l2_noise_random", "--simi_noise", "0.2",
            "--lr", "1e-4", "--batch_size", "8", "--max_steps", "2", "--eval_every", "2", "--eval_examples", "8",
            "--log_every", "1", "--out_dir", str(post), "--log_dir", str(tmp_path / "logs"), cwd=str(tmp_path))
    info = json.load(open(post / "checkpoints" / "last" / "run_config.json"))
    assert (info["config"]["task"], info["config"]["max_len"]) == ("lm", 48)  # inherited from the checkpoint
    assert info["derived"]["post_trained_from"] == str(run / "checkpoints" / "best")
    assert len(train_losses(post)) == 2


def test_schedule_auto_is_sqrt_for_the_gaussian_lm():
    cfg = TrainConfig(task="lm", process="gaussian")
    cfg.check()
    assert cfg.schedule == "sqrt"


@pytest.mark.slow
def test_bad_flags_give_one_error_line(gauss_lm_run, tiny_bert, tiny_corpus, tmp_path):
    cwd, run = gauss_lm_run
    one_error_line(run_here(*lm_args(tiny_bert, tiny_corpus, tmp_path / "s", extra=("--schedule", "spindle")),
                            cwd=str(cwd)), "--schedule spindle is not a gaussian schedule")
    one_error_line(run_here(*lm_args(tiny_bert, tiny_corpus, tmp_path / "t", extra=("--from_scratch",)),
                            cwd=str(cwd)), "--process absorbing flags")
    one_error_line(run_here("compute_elbo.py", "--checkpoint", str(run), "--out", str(tmp_path / "e.json"),
                            "--monte_carlo", cwd=str(cwd)), "--monte_carlo is for absorbing checkpoints")
    one_error_line(run_here("predict_downstream_condition.py", "--checkpoint", str(run), "--out_dir",
                            str(tmp_path / "g"), cwd=str(cwd)), "lm checkpoint", "predict.py")
    # past the canvas (max_len 48): no semi-autoregressive mode on a gaussian checkpoint (tests/test_semi_ar.py)
    one_error_line(run_here("predict.py", "--checkpoint", str(run), "--length", "47", "--out_dir",
                            str(tmp_path / "p"), cwd=str(cwd)), "--length", "no semi-autoregressive mode")


@pytest.mark.slow
def test_compute_elbo_bounds_a_gaussian_lm(gauss_lm_run, tmp_path):
    """compute_elbo.py on the tiny Gaussian LM: a finite bound, and the very number of GaussianDiffusion.nelbo called
    directly on the same examples (the seeded subset, the canvas batches) with the same per-batch generators."""
    import math

    from runtime import dist
    from runtime.assemble import load_for_inference, load_task_data

    cwd, run = gauss_lm_run
    out = tmp_path / "elbo.json"
    n, K, bs, seed = 6, 5, 4, 3
    p = run_cli("compute_elbo.py", "--checkpoint", str(run), "--num_examples", str(n), "--eval_steps", str(K),
                "--batch_size", str(bs), "--seed", str(seed), "--out", str(out), "--device", "cpu", cwd=str(cwd))
    assert "no length term" in p.stdout
    res = json.loads(out.read_text())
    assert math.isfinite(res["nelbo_per_token"]) and res["nelbo_per_token"] > 0 and res["length_nll"] == 0.0

    loaded = load_for_inference(str(run), torch.device("cpu"), task="lm")
    data, collate = load_task_data(loaded.cfg, loaded.tokenizer, ("test",), log=lambda *a, **k: None)
    rows = data["test"].shuffle(seed=seed).select(range(n))
    total, tokens = 0.0, 0
    for b in range(-(-n // bs)):
        batch = collate([rows[j] for j in range(b * bs, min((b + 1) * bs, n))])
        gen = torch.Generator().manual_seed(dist.batch_seed(seed, b))
        total += float(loaded.diffusion.nelbo(loaded.denoiser, batch["input_ids"], batch["noise_mask"], K,
                                              generator=gen).sum())
        tokens += sum(len(r["input_ids"]) - 2 for r in (rows[j] for j in range(b * bs, min((b + 1) * bs, n))))
    assert res["diffusion_nll"] == total and res["nll_bound"] == total
    assert res["tokens"] == tokens  # per token: the wordpieces, not the canvas's [SEP] and padding
