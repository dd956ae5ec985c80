"""Token counts over a training split, for the spindle schedule (``word_freq.py`` writes them).

The file is JSON: the tokenizer's name and vocabulary fingerprint, the dataset, and ``counts``
(one integer per token id). Its identity (sha256 of the file) is stored in every checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from runtime.errors import UserError
from runtime.io import write_json_atomic

FORMAT = "diffusion-word-freq-v1"


def data_name(task: str, dataset: str, data_files: str | None) -> str:
    """The dataset part of the file name: the LM corpus, or the seq2seq targets ('-pairs')."""
    from textdata.lm import dataset_name
    if task == "lm":
        return dataset_name(dataset, data_files)
    base = f"-{os.path.basename(os.path.normpath(data_files))}" if data_files else ""
    return f"{dataset}{base}-pairs"


def default_path(model_name: str, dataset: str, out_dir: str = "word_freq") -> str:
    """``word_freq/<tokenizer>__<dataset>.json``, both names made file-system safe."""
    def safe(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(s)) if os.path.isdir(s) else s)
    return os.path.join(out_dir, f"{safe(model_name)}__{safe(dataset)}.json")


def count_tokens(input_ids, vocab_size: int) -> np.ndarray:
    """Counts of each token id over an iterable of id lists. [V] int64."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in input_ids:
        counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    return counts


def save(path: str, counts: np.ndarray, tokenizer_name: str, vocab_fp: str, dataset: str) -> str:
    rec = {"format": FORMAT, "tokenizer": tokenizer_name, "vocab_fingerprint": vocab_fp,
           "vocab_size": int(len(counts)), "dataset": dataset, "num_tokens": int(counts.sum()),
           "counts": [int(c) for c in counts]}
    return write_json_atomic(path, rec, indent=None)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load(path: str, vocab_fp: str | None = None, vocab_size: int | None = None,
         create_hint: str | None = None) -> dict:
    """Read a word-frequency file and check that it belongs to this tokenizer."""
    if not os.path.isfile(path):
        hint = f"; create it with: {create_hint}" if create_hint else ""
        raise UserError(f"word-frequency file {path} not found{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read word-frequency file {path}: {e}") from e
    if rec.get("format") != FORMAT or "counts" not in rec:
        raise UserError(f"{path} is not a word-frequency file written by word_freq.py")
    if vocab_size is not None and rec["vocab_size"] != vocab_size:
        raise UserError(f"word-frequency file {path} has {rec['vocab_size']} entries (tokenizer {rec['tokenizer']}) "
                        f"but the model's vocabulary has {vocab_size}")
    if vocab_fp is not None and rec["vocab_fingerprint"] != vocab_fp:
        raise UserError(f"word-frequency file {path} was made with tokenizer {rec['tokenizer']} "
                        f"(vocabulary {rec['vocab_fingerprint']}), not this one (vocabulary {vocab_fp})")
    rec["sha256"] = file_sha256(path)
    return rec
