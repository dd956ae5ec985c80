"""The released DiffusionBERT settings through the real scripts on a tiny BERT: seq2seq training with
--loss_weighting released and decoding with --sampler released (the run_condition.sh qqp preset's path)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_here


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


EPS = 1e-20  # diffusion_condition.py's epsilon


def released_mutual_logits(logits: torch.Tensor, x_t: torch.Tensor, t: int, step: int, T: int, mask_id: int):
    """``diffusion_condition.p_forward(..., return_logits=True)`` under the mutual schedule, transcribed:
    ``log(q(x_s | p_hat) + eps) + log(q(x_t | x_s) + eps)``, s = t - step, [MASK] a candidate; at
    ``t == step`` the raw logits themselves (``retval_x0``). ``logits`` [B, L, V] -> [B, L, V] float64."""
    if t == step:
        return logits.double()
    probs = logits.double().softmax(-1)
    s = t - step
    if s > 0:  # noise_fn: keep probability clip(state[s], 0, 0.999), state[s] = prod (1 - 1 / (T - i)) = 1 - s / T
        keep = min(max(1.0 - s / T, 0.0), 0.999)
        non_mask = keep * probs
        mask_prob = 1 - non_mask.sum(-1, keepdim=True) + non_mask[..., mask_id:mask_id + 1]
        probs = torch.cat([non_mask[..., :mask_id], mask_prob, non_mask[..., mask_id + 1:]], -1)
    tp = torch.nn.functional.one_hot(x_t, logits.shape[-1]).double()
    for i in range(step):  # qt_reverse from s + step - 1 down to s, beta = 1 / (T - u)
        beta = 1.0 / (T - (s + step - 1 - i))
        at_mask = tp[..., mask_id:mask_id + 1]
        tp = torch.cat([(1 - beta) * tp[..., :mask_id] + beta * at_mask, at_mask,
                        (1 - beta) * tp[..., mask_id + 1:] + beta * at_mask], -1)
    return torch.log(probs + EPS) + torch.log(tp + EPS)


def released_predict_fn_top1(denoise, x, noise_mask, attention_mask, T: int, step: int, mask_id: int):
    """``discrete_diffusion_predict_fn`` (diffusion_condition.py) at top-k 1: from the canvas ``x`` with its
    target at [MASK], T / step iterations; each draws the argmax of the (temperature 1) logits at every
    position, and the fixed positions are the inputs again (its ``denoise_fn`` puts ``input_ids`` back).
    ``denoise(x, t, attention_mask)`` -> [B, L, V], here already zero-masked (docs/differences.md)."""
    for t in range(T, 0, -step):
        with torch.no_grad():
            logits = denoise(x, torch.full((x.shape[0],), t), attention_mask)
        x = torch.where(noise_mask, released_mutual_logits(logits, x, t, step, T, mask_id).argmax(-1), x)
    return x


@pytest.mark.slow
def test_seq2seq_released_objective_and_sampler(tmp_path, tiny_bert, tiny_pairs):
    """Every script in this process, one after the other (tiny work; a new interpreter each would cost more)."""
    run = tmp_path / "run"
    p = run_here("train.py", "--task", "seq2seq", "--dataset", "folder", "--data_files", tiny_pairs,
                 "--model_name_or_path", tiny_bert, "--num_steps", "40", "--max_len", "48",
                 "--loss_weighting", "released", "--hybrid_lambda", "3e-4", "--batch_size", "8", "--max_steps", "2",
                 "--eval_every", "2", "--eval_examples", "8", "--eval_steps", "4", "--lr", "1e-3", "--warmup_steps", "0",
                 "--log_every", "1", "--out_dir", str(run), "--log_dir", str(tmp_path / "logs"), cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = json.load(open(run / "checkpoints" / "last" / "run_config.json"))["config"]
    assert cfg["loss_weighting"] == "released" and cfg["hybrid_lambda"] == 3e-4
    common = ["predict_downstream_condition.py", "--checkpoint", str(run), "--split", "test", "--sampler", "released",
              "--steps", "10", "--topk", "15", "--mbr_size", "2", "--batch_size", "6", "--seed", "1",
              "--out_dir", str(tmp_path / "gen")]
    top1 = [a if a != "15" else "1" for a in common]
    for extra in (("--name", "a"), ("--name", "b", "--no_cache")):
        p = run_here(*common, *extra, cwd=str(tmp_path))
        assert p.returncode == 0, p.stderr[-2000:]
    assert run_here(*top1, "--name", "top1", cwd=str(tmp_path)).returncode == 0
    for s in (1, 2):
        a, b = (read_jsonl(tmp_path / "gen" / n / f"seed{s}.jsonl") for n in "ab")
        assert a == b  # the cache changes nothing
        assert len(a) == 12 and not any("[MASK]" in r["recover"] for r in a)
    check_top1_against_the_transcribed_predict_fn(run, tmp_path / "gen" / "top1" / "seed1.jsonl", tmp_path)


def check_top1_against_the_transcribed_predict_fn(run, jsonl, cwd):
    """The decoder's strings at top-k 1 (every draw an argmax, so no randomness) against the released
    conditional loop transcribed, run with the checkpoint's network on the canvas our decoder lays out (read
    from the network's first call: [CLS] src [SEP] and the target at [MASK])."""
    import os

    from evaluation.seq2seq import decode_like_diffuseq
    from runtime import api
    from runtime.assemble import load_task_data
    here = os.getcwd()
    os.chdir(cwd)  # the datasets cache of this decode
    try:
        m = api.load(str(run), device="cpu")
        data, _ = load_task_data(m.run.cfg, m.tokenizer, ("test",))
    finally:
        os.chdir(here)
    net, T, mask_id = m.run.denoiser, m.run.cfg.num_steps, m.tokenizer.mask_token_id
    first_calls = []

    def recording(x_t, t, attention_mask, positions):
        if int(t[0]) == T:
            first_calls.append((x_t.clone(), attention_mask.clone(), positions.clone()))
        return net(x_t, t, attention_mask, positions)

    decoding = m.decoding(10, None, "released", 1, 1.0, 1.0, True)
    m.run.denoiser = recording
    try:
        out = m.decode_batches(data["test"]["src_ids"], decoding, seed=1, batch_size=6)
    finally:
        m.run.denoiser = net
    texts = [r["recover"] for r in read_jsonl(jsonl)]
    assert out.texts == texts and len(first_calls) == 2

    def denoise(x, t, attention_mask):  # the full [B, L, V] logits, zero-masked as ours (documented)
        every = torch.ones_like(x, dtype=torch.bool)
        logits = net(x, t, attention_mask, every).view(*x.shape, -1).double()
        return logits.index_fill(-1, torch.tensor([mask_id]), float("-inf"))

    expected = []
    for x, att, noise_mask in first_calls:
        assert bool((x[noise_mask] == mask_id).all())
        x0 = released_predict_fn_top1(denoise, x, noise_mask, att, T, T // 10, mask_id)
        for row, nm in zip(x0.tolist(), noise_mask):
            expected.append(decode_like_diffuseq(m.tokenizer, row[int(nm.nonzero()[0]):]))
    assert expected == texts


def test_released_loss_weighting_is_refused_for_the_gaussian_process(tmp_path, tiny_bert, tiny_pairs):
    p = run_here("train.py", "--task", "seq2seq", "--process", "gaussian", "--dataset", "folder", "--data_files",
                 tiny_pairs, "--model_name_or_path", tiny_bert, "--hidden_size", "16", "--num_layers", "1",
                 "--num_heads", "2", "--max_len", "48", "--max_steps", "1", "--loss_weighting", "released",
                 "--out_dir", str(tmp_path / "g"), cwd=str(tmp_path))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[-1].startswith("error:") and "--loss_weighting released" in lines[-1]
    assert "Traceback" not in p.stderr
