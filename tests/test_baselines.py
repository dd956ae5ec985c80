"""The baselines the demos end with: the unigram model against hand counts and a brute-force perplexity, the
untrained bound against train.py's own step-0 weights, the verdict lines, and bad input."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections import Counter

import pytest
import torch

from conftest import run_cli, run_here, train_args


def one_error_line(p, *needles):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (p.returncode, p.stderr)
    for n in needles:
        assert n in lines[0], lines[0]


# ---- the unigram model


def test_unigram_against_hand_counts():
    from evaluation.baselines import Unigram
    # V = 6 ids; counted by hand on a training split: id 2 three times, id 3 once, id 5 twice (N = 6)
    uni = Unigram([0, 0, 3, 1, 0, 2])
    p = [1 / 12, 1 / 12, 4 / 12, 2 / 12, 1 / 12, 3 / 12]  # (c + 1) / (N + V)
    assert uni.log_probs.exp().tolist() == pytest.approx(p, abs=1e-15)
    x0 = torch.tensor([[0, 2, 5, 3, 1], [0, 4, 1, 0, 0]])
    noise = torch.tensor([[False, True, True, True, False], [False, True, False, False, False]])
    want = [-math.log(4 / 12) - math.log(3 / 12) - math.log(2 / 12), -math.log(1 / 12)]
    assert uni.nll(x0, noise).tolist() == pytest.approx(want, abs=1e-12)


def brute_force_unigram_ppl(corpus: str, tok, max_len: int) -> tuple[float, int]:
    """Perplexity per wordpiece of the add-one unigram model with the add-one length prior, from the text
    files alone: (ppl, tokens)."""
    def rows(split):
        for line in open(os.path.join(corpus, f"{split}.txt"), encoding="utf-8"):
            if line.strip():
                ids = tok(line.rstrip("\n"))["input_ids"]
                ids = ids if len(ids) <= max_len else ids[: max_len - 1] + [tok.sep_token_id]
                yield ids[1:-1]  # what the diffusion noises: [CLS] and [SEP] are not
    counts, lengths = Counter(), Counter()
    for r in rows("train"):
        counts.update(r)
        lengths[len(r)] += 1
    N, V, M = sum(counts.values()), len(tok), max_len - 1  # lengths 0 .. max_len - 2
    nll = tokens = 0
    for r in rows("test"):
        nll -= math.log((lengths[len(r)] + 1) / (sum(lengths.values()) + M))
        nll -= sum(math.log((counts[v] + 1) / (N + V)) for v in r)
        tokens += len(r)
    return math.exp(nll / tokens), tokens


@pytest.mark.slow
def test_compute_elbo_baselines_on_the_tiny_run(lm_run, tiny_corpus, tok, tmp_path):
    """compute_elbo.py --baselines: the unigram perplexity equals the brute-force one, over the same tokens and
    with the same length term as the bound, and the untrained bound differs from the trained one."""
    _, _, run, _ = lm_run
    proc = run_cli("compute_elbo.py", "--checkpoint", str(run), "--num_examples", "0", "--eval_steps", "1",
                   "--batch_size", "40", "--baselines", "--out", str(tmp_path / "e.json"), cwd=str(tmp_path))
    res = json.load(open(tmp_path / "e.json"))
    uni, untrained = res["baselines"]["unigram"], res["baselines"]["untrained"]
    want, tokens = brute_force_unigram_ppl(tiny_corpus, tok, max_len=32)
    assert res["num_examples"] == 40 and uni["tokens"] == tokens == res["tokens"]
    assert uni["ppl_token"] == pytest.approx(want, rel=1e-9)
    assert uni["ppl_word"] == pytest.approx(math.exp(uni["nll"] / res["words"]), rel=1e-12)
    assert uni["length_nll"] == res["length_nll"]  # the same length term
    assert untrained["nll_bound"] != res["nll_bound"] and untrained["tokens"] == res["tokens"]
    assert "PPL bound per wordpiece: trained" in proc.stdout and " -> " in proc.stdout


# ---- the untrained network is train.py's step 0


@pytest.fixture(scope="module")
def headless_bert(tmp_path_factory, tiny_bert):
    """The tiny BERT without its masked-LM head, like MiniLM: training draws a new head from its seed."""
    from transformers import AutoTokenizer, BertForMaskedLM
    path = tmp_path_factory.mktemp("headless")
    BertForMaskedLM.from_pretrained(tiny_bert).bert.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def step0_run(lm_word_freq, headless_bert, tiny_corpus):
    """A run whose only update is skipped (a NaN loss at step 1, runtime/faults.py): its checkpoint holds the
    weights train.py started from."""
    cwd, wf = lm_word_freq
    run = cwd / "step0"
    run_cli(*train_args(headless_bert, tiny_corpus, wf, run, max_steps=1), cwd=str(cwd),
            env_extra={"DLM_FAULT_NAN_STEPS": "1"})
    return run


@contextlib.contextmanager
def keep_rng():
    """Put Python's and numpy's global RNGs back (torch.random.fork_rng does torch's)."""
    import random

    import numpy as np
    state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


@pytest.mark.slow
def test_initial_network_is_train_py_step_zero(step0_run):
    from runtime import checkpoint, weights
    from runtime.assemble import initial_network
    from runtime.config import from_dict
    ckpt = checkpoint.resolve(str(step0_run), "best")
    info = json.load(open(os.path.join(ckpt, "run_config.json")))
    assert info["step"] == 1
    cfg = from_dict(info["config"])
    quiet = lambda *a, **k: None  # noqa: E731
    with torch.random.fork_rng(), keep_rng():  # initial_network seeds the global RNGs
        model = initial_network(cfg, log=quiet)[0]
        net = model.state_dict()
        cfg.seed += 1
        other = initial_network(cfg, log=quiet)[0].state_dict()
    saved = weights.read(ckpt, model)  # the checkpoint's files, tied weights filled from the network's tying
    assert saved.keys() == net.keys() and all(torch.equal(saved[k], net[k]) for k in saved)
    # the seed matters: another one draws another head over the same pretrained encoder
    head = "mlm.cls.predictions.transform.dense.weight"
    assert (other[head] - net[head]).abs().max() > 1e-3
    assert torch.equal(other["mlm.bert.encoder.layer.0.attention.self.query.weight"],
                       net["mlm.bert.encoder.layer.0.attention.self.query.weight"])


@pytest.mark.slow
def test_untrained_bound_is_the_bound_of_the_step_zero_weights(step0_run, tmp_path):
    """On a checkpoint that holds the step-0 weights, the untrained bound is the trained one to the last bit:
    same network, examples, grid and noise."""
    p = run_cli("compute_elbo.py", "--checkpoint", str(step0_run), "--num_examples", "10", "--eval_steps", "3",
                "--batch_size", "4", "--baselines", "--out", str(tmp_path / "e.json"), cwd=str(tmp_path))
    res = json.load(open(tmp_path / "e.json"))
    assert res["baselines"]["untrained"]["nll_bound"] == res["nll_bound"]
    assert res["baselines"]["untrained"]["ppl_word"] == res["ppl_word"]
    assert "does not beat untrained" in p.stdout or "beats neither" in p.stdout  # a tie is not a win


# ---- the verdict lines


def test_verdict():
    from evaluation.baselines import verdict
    lower = dict(higher_is_better=False)
    assert verdict(141.3, {"untrained": 30522.0, "unigram": 600.2}, **lower) == "beats both"
    assert verdict(700.0, {"untrained": 30522.0, "unigram": 600.2}, **lower) == "beats untrained, does not beat unigram"
    assert verdict(40000.0, {"untrained": 30522.0, "unigram": 600.2}, **lower) == "beats neither"
    assert verdict(600.2, {"untrained": 30522.0, "unigram": 600.2}, **lower) == "beats untrained, does not beat unigram"
    assert verdict(0.0347, {"copying": 0.4262}, higher_is_better=True) == "does not beat copying"
    assert verdict(0.5, {"copying": 0.4262}, higher_is_better=True) == "beats copying"
    assert verdict(float("nan"), {"copying": 0.4262}, higher_is_better=True) == "does not beat copying"


def test_summary_lines():
    from evaluation.baselines import lm_lines, seq2seq_lines
    res = {"split": "test", "num_examples": 128, "eval_steps": 32, "ppl_token": 141.3, "ppl_word": 594.1,
           "baselines": {"untrained": {"ppl_token": 30522.0, "ppl_word": 2.5e6},
                         "unigram": {"ppl_token": 600.2, "ppl_word": 3000.0}}}
    lines = lm_lines(res)
    assert lines[1] == "  PPL bound per wordpiece: trained 141.3 | untrained 30522.0 | unigram 600.2 -> beats both"
    assert lines[2] == "  PPL bound per word:      trained 594.1 | untrained 2.5e+06 | unigram 3000.0"
    assert "128 examples" in lines[0] and len(lines) == 4
    copy = {"mode": "seq2seq", "metrics": {"bleu": 0.4262, "num_sources": 24}}
    compare = {"mode": "compare", "metrics": {"rows": [
        {"setting": "diffuseq-demo-1-full", "bleu": 0.0041, "num_sources": 24},
        {"setting": "diffuseq-demo-1-adp_20", "bleu": 0.5, "num_sources": 24}]}}
    lines = seq2seq_lines(compare, copy)
    assert lines[1:] == ["  BLEU: MBR output (full) 0.0041 | copying the source 0.4262 -> does not beat copying",
                         "  BLEU: MBR output (adp_20) 0.5000 | copying the source 0.4262 -> beats copying"]
    with pytest.raises(ValueError, match="sources"):
        seq2seq_lines({"mode": "seq2seq", "metrics": {"bleu": 0.1, "num_sources": 23}}, copy)


def test_summarise_seq2seq_from_compute_metric(tmp_path):
    """summarise.py on compute_metric.py's files: an output equal to the references beats copying the source,
    and copying beats an unrelated output."""
    refs = ["the lord is my shepherd i shall not want", "in the beginning god created the heavens and the earth"]
    srcs = ["the lord is my shepherd ; i shall not want", "in the beginning god created the heaven and the earth"]
    outputs = {"same": refs, "copy": srcs, "other": ["a b c d e", "f g h i j"]}
    for name, recovers in outputs.items():
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"recover": r, "reference": ref, "source": s}) + "\n"
                         for r, ref, s in zip(recovers, refs, srcs))
        p = run_here("compute_metric.py", "--mode", "seq2seq", "--samples", str(tmp_path / f"{name}.jsonl"),
                     "--bertscore_model", "none", "--out", str(tmp_path / f"{name}.json"), cwd=str(tmp_path))
        assert p.returncode == 0, p.stderr
    copy = json.load(open(tmp_path / "copy.json"))["metrics"]["bleu"]
    assert 0.0 < copy < 1.0
    p = run_cli("summarise.py", "--bleu", str(tmp_path / "same.json"), "--copy", str(tmp_path / "copy.json"),
                cwd=str(tmp_path))
    assert p.stdout.splitlines()[1] == f"  BLEU: MBR output 1.0000 | copying the source {copy:.4f} -> beats copying"
    p = run_here("summarise.py", "--bleu", str(tmp_path / "other.json"), "--copy", str(tmp_path / "copy.json"),
                 cwd=str(tmp_path))
    assert p.stdout.splitlines()[1].endswith("-> does not beat copying")


# ---- bad input


def test_bad_input(tmp_path):
    p = run_here("summarise.py", "--elbo", str(tmp_path / "nope.json"), cwd=str(tmp_path))
    one_error_line(p, "does not exist")
    (tmp_path / "plain.json").write_text(json.dumps({"ppl_token": 1.0}))
    p = run_here("summarise.py", "--elbo", str(tmp_path / "plain.json"), cwd=str(tmp_path))
    one_error_line(p, "--baselines")
    p = run_here("summarise.py", "--bleu", str(tmp_path / "plain.json"), "--copy", str(tmp_path / "plain.json"),
                 cwd=str(tmp_path))
    one_error_line(p, "not compute_metric.py")
    p = run_here("summarise.py", "--bleu", str(tmp_path / "plain.json"), cwd=str(tmp_path))
    assert p.returncode == 2 and "--copy" in p.stderr


@pytest.mark.slow
def test_compute_elbo_baselines_bad_input(lm_run, tmp_path):
    _, _, run, _ = lm_run
    # the run's model is gone: one line, before any work
    moved = tmp_path / "moved"
    shutil.copytree(run / "checkpoints" / "best", moved)
    info = json.load(open(moved / "run_config.json"))
    info["config"]["model_name_or_path"] = str(tmp_path / "no-such-model")
    json.dump(info, open(moved / "run_config.json", "w"))
    p = run_here("compute_elbo.py", "--checkpoint", str(moved), "--eval_steps", "2", "--baselines",
                 "--out", str(tmp_path / "e.json"), cwd=str(tmp_path))
    one_error_line(p, "untrained network", "no-such-model")
    assert not (tmp_path / "e.json").exists()
    # an existing result is not replaced (another name: the refused run above keeps its e.json.partial record)
    (tmp_path / "mine.json").write_text("mine")
    p = run_here("compute_elbo.py", "--checkpoint", str(run), "--eval_steps", "2", "--baselines", "--out", str(tmp_path / "mine.json"),
                 cwd=str(tmp_path))
    one_error_line(p, "already exists", "--overwrite")
    assert (tmp_path / "mine.json").read_text() == "mine"
