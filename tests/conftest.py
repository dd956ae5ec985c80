"""Shared fixtures: a tiny BERT with the real bert-base-uncased vocabulary, and a tiny text corpus."""
from __future__ import annotations

import os
import subprocess
import sys

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


def cli_env(cwd: str, env_extra: dict | None = None) -> dict:
    """The environment the scripts run in under test: offline, two threads, a per-test datasets cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT, OMP_NUM_THREADS="2", HF_DATASETS_CACHE=os.path.join(cwd, ".hf_cache"))
    env.update(env_extra or {})
    return env


def run_cli(*args: str, cwd: str, check: bool = True, env_extra: dict | None = None):
    """Run one of the repository's scripts as a user would; returns the CompletedProcess."""
    env = cli_env(cwd, env_extra)
    cmd = [sys.executable, os.path.join(ROOT, args[0]), *args[1:]] if args[0].endswith(".py") else [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


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
