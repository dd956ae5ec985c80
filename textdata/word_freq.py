"""Token counts over a training split, for the spindle schedule (``word_freq.py`` writes them).

The file is JSON: the tokenizer's name and vocabulary fingerprint, the dataset, ``counts`` (one
integer per token id) and ``excluded_ids`` (ids that were not counted). Its identity (sha256 of the
file) is stored in every checkpoint.

What is counted: the ids that the spindle schedule noises. For language modelling that is every
token but [CLS]/[SEP] (DiffusionBERT's ``word_freq.py`` tokenises with ``add_special_tokens=False``);
for seq2seq the target ``trg [SEP]``, whose [SEP] is noised. Version 1 files (before this rule)
counted [CLS]/[SEP] in LM corpora; they still load (old checkpoints keep the counts they trained
with), and :func:`is_current` tells ``run.sh`` to rewrite a cached one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from common.errors import UserError
from common.io import write_json_atomic

FORMAT = "diffusion-word-freq-v2"
FORMATS = ("diffusion-word-freq-v1", FORMAT)  # v1: [CLS]/[SEP] counted in LM corpora


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


def count_tokens(input_ids, vocab_size: int, exclude=()) -> np.ndarray:
    """Counts of each token id over an iterable of id lists, the ids in ``exclude`` left at 0. [V] int64."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in input_ids:
        counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    counts[list(exclude)] = 0
    return counts


def save(path: str, counts: np.ndarray, tokenizer_name: str, vocab_fp: str, dataset: str,
         excluded_ids=()) -> str:
    rec = {"format": FORMAT, "tokenizer": tokenizer_name, "vocab_fingerprint": vocab_fp,
           "vocab_size": int(len(counts)), "dataset": dataset, "num_tokens": int(counts.sum()),
           "excluded_ids": sorted(int(i) for i in excluded_ids), "counts": [int(c) for c in counts]}
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
    if rec.get("format") not in FORMATS or "counts" not in rec:
        raise UserError(f"{path} is not a word-frequency file written by word_freq.py")
    if vocab_size is not None and rec["vocab_size"] != vocab_size:
        raise UserError(f"word-frequency file {path} has {rec['vocab_size']} entries (tokenizer {rec['tokenizer']}) "
                        f"but the model's vocabulary has {vocab_size}")
    if vocab_fp is not None and rec["vocab_fingerprint"] != vocab_fp:
        raise UserError(f"word-frequency file {path} was made with tokenizer {rec['tokenizer']} "
                        f"(vocabulary {rec['vocab_fingerprint']}), not this one (vocabulary {vocab_fp})")
    rec["sha256"] = file_sha256(path)
    return rec


def is_current(path: str) -> bool:
    """True if ``path`` is a word-frequency file of the current format (v1 files counted [CLS]/[SEP])."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError):
        return False
