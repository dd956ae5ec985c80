"""Language-modelling data: the offline Bible corpus, local text files, and LM1B from the hub.

Every source becomes a ``datasets.DatasetDict`` with a ``text`` column and the splits
``train``/``valid``/``test``; :func:`tokenize_splits` turns it into ``input_ids`` once and lets
datasets cache the result (keyed by the text, the tokenizer's vocabulary and ``max_len``).
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass

import torch

from common.errors import UserError
from textdata.lines import SKIP_HINT, first_problem, utf8_problem, without_bad_lines
from textdata.unknown import report_unknown

DATASETS = ("bible", "text", "lm1b")
MIN_CARVED = 50  # a carved dev/test split smaller than this is warned about
SPLITS = ("train", "valid", "test")
TOKENIZE_VERSION = "lm-v1"  # bump when the tokenisation below changes, to invalidate the cache


def dataset_name(dataset: str, data_files: str | None) -> str:
    """A short name for file names (word frequencies, outputs)."""
    if dataset == "text":
        base = os.path.basename(os.path.normpath(data_files or "text"))
        return "text-" + os.path.splitext(base)[0]
    return dataset


def _carve(ds, n_holdout: int, seed: int = 1234):
    """Deterministically split ``n_holdout`` lines off a dataset: (rest, holdout)."""
    if len(ds) <= 2 * n_holdout:
        raise UserError(f"need more than {2 * n_holdout} lines to carve valid/test splits, got {len(ds)}")
    parts = ds.train_test_split(test_size=n_holdout, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _only_blank(path: str, chunk: int = 1 << 20) -> bool:
    """Whether a file holds nothing but whitespace (it stops at the first other byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return False
    return True


def _unicode_error(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, UnicodeDecodeError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _load_text_files(files: dict[str, str], skip_bad_lines: bool = False, log=print):
    """The datasets "text" loader over ``{split: path}``, with one-line errors naming the file.

    A line that is not UTF-8 is found only when the loader fails on it (good files cost no extra
    pass): it is a ``FILE:LINE`` error, or with ``skip_bad_lines`` the file is read without such
    lines (counted and logged, ``textdata.lines.without_bad_lines``). Blank lines are not bad here:
    :func:`tokenize_splits` drops and counts them.
    """
    import datasets
    from datasets import load_dataset

    for split, path in files.items():
        if not os.path.isfile(path):
            raise UserError(f"data file {path} ({split} split) does not exist")
        if os.path.getsize(path) == 0:
            raise UserError(f"data file {path} ({split} split) is empty")
        if _only_blank(path):
            raise UserError(f"data file {path} ({split} split) has only blank lines")
    try:
        return load_dataset("text", data_files=files)
    except datasets.exceptions.DatasetGenerationError as e:
        if not _unicode_error(e):
            raise
    if skip_bad_lines:
        return load_dataset("text", data_files={s: without_bad_lines(p, utf8_problem, log)[0]
                                                for s, p in files.items()})
    for path in files.values():
        where = first_problem(path, utf8_problem)
        if where:
            raise UserError(f"{where}; {SKIP_HINT}")
    raise UserError(f"datasets could not decode {', '.join(files.values())} as UTF-8")


# LM1B on the hub is a loading-script dataset, which datasets >= 4 no longer runs; its parquet
# conversion and a mirror are tried next. None of these can be reached from an offline machine.
LM1B_SOURCES = (("lm1b", {}), ("billion-word-benchmark/lm1b", {"revision": "refs/convert/parquet"}),
                ("dvruette/lm1b", {}))


def _load_lm1b(log):
    from datasets import load_dataset
    errors = []
    for name, kw in LM1B_SOURCES:
        try:
            raw = load_dataset(name, **kw)
            log(f"data: LM1B from {name} {kw or ''}".rstrip())
            return raw
        except Exception as e:  # network, missing repo, script-based repo: try the next source
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise UserError("could not load LM1B from the Hugging Face hub (" + "; ".join(errors) + "); it needs "
                    "internet access; offline, use --dataset text --data_files with a local copy")


def load_text_splits(dataset: str, data_files: str | None = None, data_dir: str = "data",
                     log=print, skip_bad_lines: bool = False):
    """The raw text splits of ``dataset`` as a DatasetDict with ``train``, ``valid``, ``test``.

    * ``bible``: the offline default corpus (KJV and WEB verses), written to ``data_dir/bible``.
    * ``text``: ``data_files`` is a file (valid/test are carved off deterministically) or a folder
      with ``train.txt`` and optional ``valid.txt``/``test.txt``; one example per line. A line that
      is not UTF-8 is an error, or skipped (and counted) with ``skip_bad_lines``.
    * ``lm1b``: ``datasets.load_dataset("lm1b")`` (needs the hub); valid is carved from train.
    """
    import datasets
    from datasets import DatasetDict

    datasets.disable_progress_bars()  # our own log lines say what happened
    if dataset == "bible":
        from textdata.bible import write_lm_corpus
        files = write_lm_corpus(os.path.join(data_dir, "bible"))
        ds = _load_text_files({s: files[s] for s in SPLITS})
    elif dataset == "text":
        if not data_files:
            raise UserError("--dataset text needs --data_files (a text file or a folder with train.txt)")
        if os.path.isdir(data_files):
            files = {s: os.path.join(data_files, f"{s}.txt") for s in SPLITS
                     if os.path.isfile(os.path.join(data_files, f"{s}.txt"))}
            if "train" not in files:
                raise UserError(f"folder {data_files} has no train.txt")
        elif os.path.isfile(data_files):
            files = {"train": data_files}
        else:
            raise UserError(f"--data_files {data_files} does not exist")
        ds = _load_text_files(files, skip_bad_lines, log)
        n_hold = max(1, min(5000, len(ds["train"]) // 100))
        for split in ("valid", "test"):
            if split not in ds:
                ds["train"], ds[split] = _carve(ds["train"], n_hold)
                log(f"data: carved a {split} split of {n_hold} lines off {files['train']} (seeded, deterministic)")
                if n_hold < MIN_CARVED:
                    log(f"warning: the carved {split} split has only {n_hold} lines (1% of {files['train']}), "
                        f"fewer than {MIN_CARVED}: its figures are noisy; give a {split}.txt beside train.txt")
    elif dataset == "lm1b":
        raw = _load_lm1b(log)
        train, valid = _carve(raw["train"], 10000)
        ds = DatasetDict(train=train, valid=valid, test=raw["test"])
    else:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DatasetDict({s: ds[s] for s in SPLITS})


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (tokens in id order): tells two tokenizers apart."""
    vocab = tokenizer.get_vocab()
    toks = sorted(vocab.items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in toks).encode()).hexdigest()[:16]


def tokenize_splits(ds, tokenizer, max_len: int, log=print):
    """Add ``input_ids`` (``[CLS] ... [SEP]``, at most ``max_len``), ``length`` and ``n_words``.

    Empty lines are dropped and counted; longer lines are cut to ``max_len`` wordpieces (the final
    [SEP] kept) and counted. ``n_words`` counts the whitespace words actually kept.
    """
    if max_len < 3:
        raise UserError(f"--max_len must be at least 3 ([CLS] token [SEP]), got {max_len}")
    vfp = vocab_fingerprint(tokenizer)
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id

    def encode(batch):
        enc = tokenizer(batch["text"], add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        ids, trunc, words = [], [], []
        for text, e in zip(batch["text"], enc):
            cut = len(e) > max_len
            if cut:
                e = e[: max_len - 1] + [sep]
                text = tokenizer.decode(e, skip_special_tokens=True)
            ids.append(e)
            trunc.append(cut)
            words.append(len(text.split()))
        return {"input_ids": ids, "length": [len(e) for e in ids], "truncated": trunc, "n_words": words}

    out = {}
    for split, d in ds.items():
        n0 = len(d)
        d = d.filter(lambda b: [bool(x.strip()) for x in b["text"]], batched=True,
                     new_fingerprint=hashlib.sha256(f"{d._fingerprint}-nonempty".encode()).hexdigest()[:16])
        if len(d) < n0:
            log(f"data: {split}: dropped {n0 - len(d)} empty lines")
        if len(d) == 0:
            raise UserError(f"the {split} split has no non-empty lines")
        fp = hashlib.sha256(f"{d._fingerprint}-{vfp}-{max_len}-{TOKENIZE_VERSION}".encode()).hexdigest()[:16]
        d = d.map(encode, batched=True, batch_size=1000, new_fingerprint=fp, desc=f"tokenising {split}")
        n_trunc = sum(d["truncated"])
        if n_trunc:
            log(f"data: {split}: {n_trunc} of {len(d)} lines longer than --max_len {max_len} were truncated")
        report_unknown(d, {"input_ids": "text"}, tokenizer, split, log)
        out[split] = d
    from datasets import DatasetDict
    return DatasetDict(out)


def length_counts(ds, max_len: int) -> list[int]:
    """Histogram of the number of noised tokens (length minus [CLS] and [SEP]): index n -> count."""
    c = Counter(int(n) - 2 for n in ds["length"])
    return [c.get(n, 0) for n in range(max_len - 1)]


@dataclass
class Collator:
    """Dynamic padding: ``input_ids``, ``attention_mask`` and ``noise_mask`` (diffused positions:
    everything but [CLS]/[SEP]/padding), plus ``n_words`` for per-word perplexity."""

    pad_id: int
    special_ids: tuple[int, ...]

    def __call__(self, rows):
        L = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            att[i, :n] = 1
        noise = att.bool()
        for sid in self.special_ids:
            noise &= ids != sid
        return {"input_ids": ids, "attention_mask": att, "noise_mask": noise,
                "n_words": torch.tensor([r.get("n_words", 0) for r in rows], dtype=torch.long)}


@dataclass
class CanvasCollator:
    """Diffusion-LM's layout for the Gaussian process: every row is a canvas of ``canvas_len`` positions,
    ``[CLS] w1..wn [SEP] [PAD]...[PAD]``. Everything after [CLS] is noised and generated, [SEP] and the
    padding included, so the model decides the length (as DiffuSeq's target padding); [CLS] is the fixed
    prefix, kept at its embedding like a seq2seq source. Returns ``input_ids`` [B, L] long,
    ``attention_mask`` [B, L] long (all ones: padding is a token to predict), ``noise_mask`` [B, L] bool
    (all but position 0) and ``n_words`` [B] long, with ``L = canvas_len``."""

    pad_id: int
    canvas_len: int

    def __call__(self, rows):
        L = self.canvas_len
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            if n > L:
                raise UserError(f"a line of {n} tokens does not fit the canvas of {L}; tokenise with "
                                f"max_len <= canvas_len")
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        noise = torch.ones_like(ids, dtype=torch.bool)
        noise[:, 0] = False
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "noise_mask": noise,
                "n_words": torch.tensor([r.get("n_words", 0) for r in rows], dtype=torch.long)}


def collator_for(tokenizer, canvas_len: int | None = None) -> Collator | CanvasCollator:
    """The LM batches: dynamic padding with the special tokens never noised (absorbing), or with
    ``canvas_len`` the fixed canvas of the Gaussian process (``CanvasCollator``)."""
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no padding token")
    if canvas_len is not None:
        return CanvasCollator(tokenizer.pad_token_id, canvas_len)
    special = tuple(i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id,
                                tokenizer.eos_token_id) if i is not None)
    return Collator(tokenizer.pad_token_id, special)


class LengthPrior:
    """p(n), the number of noised tokens per example, from training-split counts (add-one smoothed
    over 0..max). The model is ``p(x) = p(n) p(tokens | n)``: samples draw n first, and the NELBO adds
    ``-log p(n)``, so it stays a bound on ``-log p(x)``."""

    def __init__(self, counts: list[int]):
        c = torch.tensor(counts, dtype=torch.float64)
        self.probs = (c + 1.0) / (c.sum() + len(c))
        self.empirical = c / c.sum().clamp_min(1.0)

    def log_prob(self, n: torch.Tensor) -> torch.Tensor:
        return torch.log(self.probs[n.long().clamp(0, len(self.probs) - 1)])

    def sample(self, num: int, max_n: int | None = None, generator: torch.Generator | None = None,
               min_n: int = 0) -> torch.Tensor:
        """Draw lengths from the empirical histogram (no smoothing) conditioned on ``min_n <= n <= max_n``.
        [num] long."""
        p = self.empirical.clone()
        if max_n is not None:
            p[max_n + 1:] = 0.0
        p[:min_n] = 0.0
        if p.sum() <= 0:
            between = f"between {min_n} and {max_n}" if min_n else f"at most {max_n}"
            raise UserError(f"no training example has {between} tokens")
        return torch.multinomial(p, num, replacement=True, generator=generator)

