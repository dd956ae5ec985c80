"""Shared fixtures: a tiny BERT with the real bert-base-uncased vocabulary, tiny corpora, and the tiny
checkpoints that the command-line tests read (each trained once per session); helpers to run the scripts.

The slowest tests (those that train or launch torchrun) are marked ``slow``: ``pytest -m "not slow" tests``
is the quick inner loop, plain ``pytest tests`` (CI) runs everything."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Plain `pytest` (unlike `python -m pytest`) does not put the repository root on sys.path.
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 BertForMaskedLM saved with the MiniLM tokenizer (30522 wordpieces)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from common.loading import resolve_model_path

    path = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """A folder with train/valid/test.txt: Bible verses, one per line."""
    from textdata.bible import load_verse_pairs

    pairs, _ = load_verse_pairs()
    path = tmp_path_factory.mktemp("tiny_corpus")
    chunks = {"train": pairs[:240], "valid": pairs[300:340], "test": pairs[400:440]}
    for split, ps in chunks.items():
        with open(path / f"{split}.txt", "w", encoding="utf-8") as f:
            f.write("".join(f"{p.web}\n" for p in ps))
    return str(path)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny tensors (thread start-up would dominate); use it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli_env(cwd: str, env_extra: dict | None = None) -> dict:
    """The environment the scripts run in under test: offline, two threads, a per-test datasets cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT, OMP_NUM_THREADS="2", HF_DATASETS_CACHE=os.path.join(cwd, ".hf_cache"))
    env.update(env_extra or {})
    return env


_side_by_side = threading.local()  # set in the threads of run_together


def run_cli(*args: str, cwd: str, check: bool = True, env_extra: dict | None = None):
    """Run one of the repository's scripts as a user would; returns the CompletedProcess."""
    env = cli_env(cwd, env_extra)
    if getattr(_side_by_side, "on", False) or args[:2] == ("-m", "torch.distributed.run"):
        # processes that share the cores let their idle OpenMP threads sleep: a spinning thread keeps the core
        # from the thread it waits for (two decodes side by side on a busy 2-core machine: 6 s, not 20-40 s)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, os.path.join(ROOT, args[0]), *args[1:]] if args[0].endswith(".py") else [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_together(*calls):
    """Run independent ``run_cli`` calls side by side (each a function of no arguments, e.g. a lambda) and
    return their results in order: a script is mostly single-threaded start-up and tiny tensors, so a second
    one uses the idle core. Calls that run together must not write the same files, datasets cache included
    (give each its own ``cwd`` where they load data)."""
    def side_by_side(call):
        _side_by_side.on = True
        try:
            return call()
        finally:
            _side_by_side.on = False

    workers = min(len(calls), max(2, (os.cpu_count() or 2) // 2))
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(side_by_side, call) for call in calls]
        return [f.result() for f in futures]


def run_here(*args: str, cwd: str) -> subprocess.CompletedProcess:
    """``run_cli`` in this process, for a command that must stop at a flag or config check: the same exit
    status, stdout and stderr, without a new interpreter's 2-3 s of imports. What a script may change in
    the process is put back: the working directory, the RNGs, the thread count, flush-denormal, the
    SIGINT/SIGTERM handlers, the warning filters and the datasets cache (``cwd``/.hf_cache, as ``cli_env``).
    An exception other than ``SystemExit`` (a traceback from the real script) propagates and fails the test."""
    import contextlib
    import io
    import random
    import signal
    import warnings

    import datasets
    import numpy as np
    import torch

    out, err = io.StringIO(), io.StringIO()
    rng = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cache, here = datasets.config.HF_DATASETS_CACHE, os.getcwd()
    try:
        datasets.config.HF_DATASETS_CACHE = os.path.join(cwd, ".hf_cache")
        os.chdir(cwd)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_script(*args)
    finally:
        os.chdir(here)
        datasets.config.HF_DATASETS_CACHE = cache
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def one_error_line(proc, *needles) -> None:
    """A script stopped with exit status 2 and, last on stderr, one ``error:`` line holding every needle (no
    traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[-1], lines[-1]


def run_script(script: str, *args: str) -> int:
    """Run a script's command line in this process (``sys.argv`` in, exit status out): faster than a
    subprocess for the cheap scripts, and ``capsys`` sees what it prints."""
    import runpy
    saved = sys.argv
    sys.argv = [os.path.join(ROOT, script), *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> str:
    """A DiffuSeq-format folder (train/valid/test.jsonl) of KJV -> WEB verse pairs."""
    import json

    from textdata.bible import load_verse_pairs

    pairs, _ = load_verse_pairs()
    path = tmp_path_factory.mktemp("tiny_pairs")
    chunks = {"train": pairs[:160], "valid": pairs[300:324], "test": pairs[400:412]}
    for split, ps in chunks.items():
        with open(path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.write("".join(json.dumps({"src": p.kjv, "trg": p.web}) + "\n" for p in ps))
    return str(path)


@pytest.fixture
def private_hf_cache(tmp_path, monkeypatch):
    """A datasets cache of the test's own (for in-process loading; the CLI runs get one from cli_env)."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="session")
def tok():
    """The MiniLM (bert-base-uncased) tokenizer."""
    from transformers import AutoTokenizer

    from common.loading import resolve_model_path
    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))


# ---- the tiny checkpoints of the command-line tests: each trained once per session and shared, so a test
# must not write into them (copy a run directory into tmp_path first to resume or overwrite it); the
# session ends with an error if one did

def files_of(run) -> list:
    """(path, size, mtime) of every file under ``run``: what a test must leave as it found it."""
    return sorted((os.path.relpath(os.path.join(d, f), run), st.st_size, st.st_mtime_ns)
                  for d, _, fs in os.walk(run) for f in fs for st in [os.stat(os.path.join(d, f))])


def unchanged(run, before) -> None:
    assert files_of(run) == before, f"a test wrote into the shared run {run}; copy it into tmp_path first"

def train_args(tiny_bert, tiny_corpus, wf, out, max_steps=4, extra=()):
    """train.py on the tiny BERT and corpus: absorbing diffusion, --task lm, the spindle schedule."""
    return ["train.py", "--model_name_or_path", tiny_bert, "--dataset", "text", "--data_files", tiny_corpus,
            "--word_freq_file", str(wf), "--num_steps", "64", "--max_len", "32", "--batch_size", "8",
            "--eval_steps", "8", "--eval_examples", "16", "--lr", "1e-3", "--warmup_steps", "0",
            "--decay", "constant", "--log_every", "1", "--save_every", "2", "--eval_every", "2",
            "--max_steps", str(max_steps), "--out_dir", str(out), "--log_dir", str(out) + "-logs", *extra]


def gauss_args(tiny_bert, data, out, max_steps=4, extra=(), T=100, task="seq2seq"):
    """train.py for a tiny DiffuSeq transformer (--process gaussian): on the verse pairs (``data`` = tiny_pairs),
    or with ``task="lm"`` a Diffusion-LM on the verses (``data`` = tiny_corpus)."""
    dataset = "folder" if task == "seq2seq" else "text"
    return ("train.py", "--task", task, "--process", "gaussian", "--dataset", dataset, "--data_files", data,
            "--model_name_or_path", tiny_bert, "--num_steps", str(T), "--eval_steps", str(min(T, 64)), "--max_len", "48", "--emb_dim", "8",
            "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2", "--batch_size", "8",
            "--max_steps", str(max_steps), "--eval_every", "2", "--eval_examples", "8", "--save_every", "2",
            "--lr", "1e-3", "--warmup_steps", "0", "--decay", "constant", "--log_every", "1", "--ema_rate", "0.9",
            "--out_dir", str(out), "--log_dir", str(out) + "_logs", *extra)


def train_losses(run) -> dict:
    """{step: training loss} from a run's metrics.jsonl."""
    import json
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r.get("split") == "train"}


def assert_resume_is_exact(tmp_path, args_of, steps=8) -> str:
    """Train ``steps`` optimizer steps in one go, and half of them then ``--resume`` to ``steps``: the same
    training losses and bitwise the same weights (the EMA too, where the run keeps one). ``args_of(out,
    max_steps, extra)`` gives train.py's arguments. Returns the uninterrupted run's directory."""
    import torch
    from safetensors.torch import load_file

    run, part = tmp_path / "run", tmp_path / "part"
    (tmp_path / "c").mkdir()  # the second one's datasets cache: they run side by side
    run_together(lambda: run_cli(*args_of(run, steps, ()), cwd=str(tmp_path)),
                 lambda: run_cli(*args_of(part, steps // 2, ()), cwd=str(tmp_path / "c")))
    run_cli(*args_of(part, steps, ("--resume", str(part))), cwd=str(tmp_path))
    assert len(train_losses(run)) == steps and train_losses(part) == train_losses(run)
    last = run / "checkpoints" / "last"
    names = [n for n in ("model.safetensors", "denoiser.safetensors", "denoiser_ema.safetensors")
             if (last / n).is_file()]
    assert names
    for name in names:
        a, b = load_file(last / name), load_file(part / "checkpoints" / "last" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    return run


@pytest.fixture(scope="session")
def lm_word_freq(tmp_path_factory, tiny_bert, tiny_corpus):
    """(folder, word-frequency file) of the tiny corpus, written by word_freq.py."""
    cwd = tmp_path_factory.mktemp("e2e")
    wf = cwd / "wf.json"
    run_cli("word_freq.py", "--model_name_or_path", tiny_bert, "--dataset", "text", "--data_files", tiny_corpus,
            "--out", str(wf), cwd=str(cwd))
    return cwd, wf


@pytest.fixture(scope="session")
def lm_run(lm_word_freq, tiny_bert, tiny_corpus):
    """(folder, word-frequency file, run directory, train.py's CompletedProcess): 4 steps of ``train_args``."""
    cwd, wf = lm_word_freq
    run = cwd / "run"
    proc = run_cli(*train_args(tiny_bert, tiny_corpus, wf, run), cwd=str(cwd))
    before = files_of(run)
    yield cwd, wf, run, proc
    unchanged(run, before)


@pytest.fixture(scope="session")
def gauss_run(tmp_path_factory, tiny_bert, tiny_pairs):
    """(folder, run directory): 4 steps of ``gauss_args`` (T = 100, EMA)."""
    cwd = tmp_path_factory.mktemp("gauss")
    run = cwd / "run"
    run_cli(*gauss_args(tiny_bert, tiny_pairs, run), cwd=str(cwd))
    before = files_of(run)
    yield cwd, run
    unchanged(run, before)


@pytest.fixture(scope="session")
def gauss_lm_run(tmp_path_factory, tiny_bert, tiny_corpus):
    """(folder, run directory): 4 steps of a tiny Gaussian LM, ``gauss_args(task="lm")`` (T = 100, --schedule
    auto), read by tests/test_gaussian_lm.py and tests/test_infill.py."""
    cwd = tmp_path_factory.mktemp("gauss_lm")
    run = cwd / "run"
    run_cli(*gauss_args(tiny_bert, tiny_corpus, run, task="lm"), cwd=str(cwd))
    before = files_of(run)
    yield cwd, run
    unchanged(run, before)


@pytest.fixture(scope="session")
def seq2seq_run(tmp_path_factory, tiny_bert, tiny_pairs):
    """(folder, run directory): 3 steps of absorbing seq2seq training on the tiny BERT (T = 50)."""
    cwd = tmp_path_factory.mktemp("cond")
    run = cwd / "run"
    run_cli("train.py", "--task", "seq2seq", "--dataset", "folder", "--data_files", tiny_pairs,
            "--model_name_or_path", tiny_bert, "--num_steps", "50", "--max_len", "48",
            "--batch_size", "8", "--max_steps", "3", "--eval_every", "3", "--eval_examples", "8",
            "--eval_steps", "4", "--lr", "1e-3", "--warmup_steps", "0", "--log_every", "1",
            "--out_dir", str(run), "--log_dir", str(cwd / "logs"), cwd=str(cwd))
    before = files_of(run)
    yield cwd, run
    unchanged(run, before)
