"""DiffuSeq-format pair data: validation, loading, tokenisation and the seq2seq canvas.

A DiffuSeq folder holds ``train.jsonl``, ``valid.jsonl`` (some releases: ``dev.jsonl``) and
``test.jsonl``, one ``{"src": ..., "trg": ...}`` object per line. Each file is checked line by line
by :func:`validate_jsonl` before ``datasets`` sees it, so a bad line is reported as ``FILE:LINE: ...``
instead of an arrow error (or, with ``--skip_bad_lines``, skipped and counted in the log).
:func:`tokenize_pairs` adds ``src_ids``/``trg_ids`` once and lets datasets cache them;
:class:`PairCollator` lays a batch out as the canvas ``src_ids | trg [SEP] [PAD]...`` whose target
region (``noise_mask``) is what the diffusion model corrupts and learns to restore.

Two canvases (``--canvas``): ``ours``, ``[CLS] src [SEP] | trg [SEP]``, and ``released``, DiffusionBERT's
``[CLS] prompt(src) | trg [SEP]`` (``dataloader.py``: no separator between source and target, and the
source wrapped in the task's prompt text, :data:`RELEASED_PROMPTS`). Two rules cut a pair that does not fit
``max_len`` (``--truncation``): ``ours`` and DiffuSeq's (``text_datasets.py``), see :func:`fit_pair`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from common.errors import UserError
from textdata.lines import SKIP_HINT, decode, read_lines, without_bad_lines
from textdata.lm import vocab_fingerprint
from textdata.unknown import report_unknown

SPLITS = ("train", "valid", "test")
TOKENIZE_VERSION = "pairs-v2"  # bump when the tokenisation below changes, to invalidate the cache
# The shortest max_len whose truncation still leaves [CLS] x [SEP] (max_len // 2 >= 3) and y [SEP].
MIN_MAX_LEN = 6
CANVASES = ("ours", "released")
TRUNCATIONS = ("ours", "diffuseq")
# DiffusionBERT's prompt text (dataloader.py, each loader's add_prompt): the source becomes
# before + src + after, the target is unchanged. DDP_main_conditional.py trains qqp and QT (Quasar-T);
# the wiki and CC loaders are defined there but not wired to a task name.
RELEASED_PROMPTS = {"qqp": ('"', '" is equal to "'), "quasar_t": (" Answer: ", " Question: "),
                    "wiki_auto": ('"', '" can be summarized as: '), "commonsense_conversation": ("", " - ")}


def _json_type(v) -> str:
    """The JSON name of a decoded value, for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _reject_constant(name: str):
    # json.loads accepts NaN/Infinity, which are not JSON and which the arrow reader rejects
    raise ValueError(f"{name} is not valid JSON")


def pair_problem(raw: bytes, strict: bool = True) -> str | None:
    """Why one raw line of a DiffuSeq file is not an example, or None if it is one (``""``: a blank
    line that non-strict reading passes over). See :func:`validate_jsonl` for the rules."""
    line, reason = decode(raw)
    if reason:
        return reason
    if not line.strip():
        return "blank line (expected one JSON object per line)" if strict else ""
    try:
        obj = json.loads(line.rstrip("\r\n"), parse_constant=_reject_constant)  # columns within this line
    except json.JSONDecodeError as e:
        return f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"  # some msgs end in "at"
    except (ValueError, RecursionError) as e:
        return f"malformed JSON ({type(e).__name__}: {e})"
    if not isinstance(obj, dict):
        return f'expected a JSON object with "src" and "trg", got {_json_type(obj)}'
    missing = [k for k in ("src", "trg") if k not in obj]
    if missing:
        return "missing " + " and ".join(f'"{k}"' for k in missing)
    for k in ("src", "trg"):
        if not isinstance(obj[k], str):
            return f'"{k}" is {_json_type(obj[k])}, not a string'
        if strict and not obj[k].strip():
            return f'empty "{k}"'
    return None


def validate_jsonl(path: str, strict: bool = True, hint: str = "") -> int:
    """Check a DiffuSeq-format file line by line; return its number of examples.

    Every line must be valid UTF-8 and one JSON object with string fields ``"src"`` and ``"trg"``
    (other fields are allowed). With ``strict`` (the default) blank lines and fields that are empty
    after ``strip()`` are errors too; ``strict=False`` skips blank lines (as the datasets json reader
    does) and accepts empty fields. A leading UTF-8 byte-order mark is accepted. An empty file, or
    one with no examples, is an error. Every error is a one-line ``UserError`` naming ``FILE:LINE``
    (``hint``, if given, is appended to a bad line's message).
    """
    path = os.fspath(path)
    n = lineno = 0
    for lineno, raw in read_lines(path):
        reason = pair_problem(raw, strict)
        if reason:
            raise UserError(f"{path}:{lineno}: {reason}" + (f"; {hint}" if hint else ""))
        n += reason is None
    if lineno == 0:
        raise UserError(f"{path} is empty (expected one JSON object per line)")
    if n == 0:
        raise UserError(f"{path} has no examples, only blank lines")
    return n


def _diffuseq_files(data_dir: str | None, dataset: str, splits) -> dict[str, str]:
    """{split: path} in a DiffuSeq folder; ``dev.jsonl`` stands in for a missing ``valid.jsonl``."""
    if not data_dir:
        raise UserError(f"dataset {dataset!r} needs a data folder with train.jsonl, valid.jsonl and test.jsonl "
                        f"(DiffuSeq format)")
    if not os.path.isdir(data_dir):
        what = "is not a folder" if os.path.exists(data_dir) else "does not exist"
        raise UserError(f"data folder {data_dir} {what} (expected a DiffuSeq folder with train.jsonl, "
                        f"valid.jsonl and test.jsonl)")
    files = {}
    for split in splits:
        path = os.path.join(data_dir, f"{split}.jsonl")
        dev = os.path.join(data_dir, "dev.jsonl")
        if split == "valid" and not os.path.isfile(path) and os.path.isfile(dev):
            path = dev
        if not os.path.isfile(path):
            also = f" (nor does {dev})" if split == "valid" else ""
            raise UserError(f"{path} ({split} split) does not exist{also}")
        files[split] = path
    return files


def load_pair_splits(dataset: str, data_dir: str | None = None, corpus_dir: str = "data", splits=SPLITS,
                     log=print, skip_bad_lines: bool = False):
    """The requested splits of a pair task as a DatasetDict with the string columns ``src``, ``trg``.

    * ``bible``: the offline KJV -> WEB task, written by ``textdata.bible.write_pair_corpus`` to
      ``corpus_dir/bible_pairs`` (``data_dir`` is not used).
    * any other name (``qqp``, ``wiki_auto``, ``quasar_t``, ``commonsense_conversation``, ``folder``):
      ``data_dir`` is a DiffuSeq folder with ``train.jsonl``, ``valid.jsonl`` (or ``dev.jsonl``) and
      ``test.jsonl``; the name only labels the log lines.

    Each file is checked with :func:`validate_jsonl` and then read with the datasets json loader
    (which caches the arrow table), one split at a time; other fields are dropped. With
    ``skip_bad_lines`` a bad line is skipped instead of being an error: the count and the first few
    are logged per file, and datasets reads a cleaned copy (``textdata.lines.without_bad_lines``).
    """
    import datasets
    from datasets import DatasetDict, load_dataset

    splits = tuple(dict.fromkeys(splits))
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"unknown split(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"choose from {', '.join(SPLITS)}")
    datasets.disable_progress_bars()  # our own log lines say what happened
    if dataset == "bible":
        from textdata.bible import write_pair_corpus
        if data_dir:
            log(f"data: bible: ignoring the data folder {data_dir} (the corpus is built offline)")
        written = write_pair_corpus(os.path.join(corpus_dir, "bible_pairs"))
        files = {s: written[s] for s in splits}
    else:
        files = _diffuseq_files(data_dir, dataset, splits)
    counts, read = {}, {}
    for s, p in files.items():
        if skip_bad_lines:
            read[s], counts[s] = without_bad_lines(p, pair_problem, log)
        else:
            read[s], counts[s] = p, validate_jsonl(p, hint=SKIP_HINT)
    out = {}
    for s in splits:
        # one split at a time: loaded together, the splits must share one schema, extra fields included
        try:
            d = load_dataset("json", data_files={s: read[s]}, split=s)
        except datasets.exceptions.DatasetGenerationError as e:
            cause = str(e.__cause__ or e).splitlines()[0] if str(e.__cause__ or e) else type(e).__name__
            raise UserError(f"datasets could not read {files[s]} ({cause}); fields other than \"src\" and "
                            f"\"trg\" that appear only on some lines can cause this: remove them") from e
        if len(d) != counts[s]:  # the validator and the arrow reader disagree about the file
            raise UserError(f"{files[s]}: datasets read {len(d)} rows but the file has {counts[s]} examples")
        out[s] = d.select_columns(["src", "trg"])
        log(f"data: {dataset} {s}: {counts[s]} pairs from {files[s]}")
    return DatasetDict(out)


def fit_pair(s: list, t: list, max_len: int, canvas: str = "ours", rule: str = "ours") -> tuple:
    """Cut the source words ``s`` and target words ``t`` (ids, no special tokens) of a pair that does not
    fit ``max_len`` with the canvas's special tokens; ``(s, t, src_cut, trg_cut)``.

    * ``ours``: the source first, just enough for the pair to fit but never below ``max_len // 2`` tokens
      with its special tokens; then the target to what is left.
    * ``diffuseq`` (DiffuSeq's ``merge_and_mask``): while the words do not fit ``max_len - 5`` (its
      ``seq_len - 3`` counts each side's [CLS]), drop the last word of the longer side, of both when
      they are equally long. The same words survive as in DiffuSeq at ``--seq_len max_len``; our canvas
      spends 3 positions on special tokens, not 5, so 2 stay as padding.
    """
    n_src = 2 if canvas == "ours" else 1  # [CLS] src [SEP], or [CLS] src (released)
    ns, nt = len(s), len(t)
    if rule == "diffuseq":
        while ns + nt > max_len - 5:
            longer_s, longer_t = ns >= nt, nt >= ns
            ns, nt = ns - longer_s, nt - longer_t
    elif ns + n_src + nt + 1 > max_len:
        keep = max(max_len // 2, max_len - nt - 1) - n_src  # cut the source only as much as needed
        ns = min(ns, keep)
        nt = min(nt, max_len - n_src - ns - 1)
    return s[:ns], t[:nt], ns < len(s), nt < len(t)


def source_ids(tokenizer, texts: list[str], canvas: str = "ours", dataset: str | None = None) -> list[list[int]]:
    """The uncut source cells of each text: ``[CLS] src [SEP]`` (ours) or ``[CLS] before + src + after``
    (released, with the dataset's :data:`RELEASED_PROMPTS`, none for other datasets; the prompted string is
    tokenised as one, as DiffusionBERT does)."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if canvas == "released":
        before, after = RELEASED_PROMPTS.get(dataset, ("", ""))
        texts = [before + x + after for x in texts]
    words = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return [[cls, *w] + ([sep] if canvas == "ours" else []) for w in words]


def tokenize_pairs(ds, tokenizer, max_len: int, log=print, canvas: str = "ours", truncation: str = "ours",
                   dataset: str | None = None):
    """Add ``src_ids`` and ``trg_ids = trg [SEP]`` to every split, fitting ``len(src_ids) + len(trg_ids) <=
    max_len``; the raw ``src``/``trg`` text stays (for references). ``src_ids`` is ``[CLS] src [SEP]``
    (``canvas="ours"``) or DiffusionBERT's ``[CLS] prompt(src)`` (``"released"``, the prompt of ``dataset``:
    :func:`source_ids`).

    A pair that does not fit is cut by :func:`fit_pair` with ``truncation`` (``ours``: the source first,
    never below ``max_len // 2`` tokens; ``diffuseq``: the longer side first); the bool columns
    ``src_cut``/``trg_cut`` record it, and the counts are logged per split. ``max_len >= 6``. The result is
    cached by datasets, keyed by the split's fingerprint, the vocabulary, ``max_len``, the canvas (with its
    prompt) and the rule.
    """
    from datasets import DatasetDict

    if max_len < MIN_MAX_LEN:
        raise UserError(f"--max_len must be at least {MIN_MAX_LEN} for pairs (the source is cut to max_len // 2 "
                        f"tokens and must keep [CLS] x [SEP], the target y [SEP]), got {max_len}")
    if canvas not in CANVASES or truncation not in TRUNCATIONS:
        raise ValueError(f"canvas must be one of {CANVASES} and truncation one of {TRUNCATIONS}, "
                         f"got {canvas!r}, {truncation!r}")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise UserError("the tokenizer has no [CLS] or no [SEP] token, which the pair canvas needs")
    vfp = vocab_fingerprint(tokenizer)
    head, tail = [cls], ([sep] if canvas == "ours" else [])
    prompt = RELEASED_PROMPTS.get(dataset) if canvas == "released" else None

    def encode(batch):
        enc_s = [x[1:len(x) - len(tail)] for x in source_ids(tokenizer, batch["src"], canvas, dataset)]
        enc_t = tokenizer(batch["trg"], add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        out = {"src_ids": [], "trg_ids": [], "src_cut": [], "trg_cut": []}
        for s, t in zip(enc_s, enc_t):
            s, t, src_cut, trg_cut = fit_pair(s, t, max_len, canvas, truncation)
            out["src_ids"].append(head + s + tail)
            out["trg_ids"].append(t + [sep])
            out["src_cut"].append(src_cut)
            out["trg_cut"].append(trg_cut)
        return out

    layout = "" if (canvas, truncation) == ("ours", "ours") else f"-{canvas}-{prompt}-{truncation}"
    how = (f"never below {max_len // 2} tokens" if truncation == "ours" else
           f"DiffuSeq's rule: the longer side first, to {max_len - 5} words")
    result = {}
    for split, d in ds.items():
        missing = [c for c in ("src", "trg") if c not in d.column_names]
        if missing:
            raise UserError(f"the {split} split has no {' or '.join(missing)} column (columns: {d.column_names})")
        fp = hashlib.sha256(f"{d._fingerprint}-{vfp}-{max_len}-{TOKENIZE_VERSION}{layout}".encode()).hexdigest()[:16]
        d = d.map(encode, batched=True, batch_size=1000, new_fingerprint=fp, desc=f"tokenising {split}")
        n_src, n_trg = sum(d["src_cut"]), sum(d["trg_cut"])
        log(f"data: {split}: {len(d)} pairs; source cut in {n_src} ({how}), target cut "
            f"in {n_trg} (max_len {max_len})")
        report_unknown(d, {"src_ids": "src", "trg_ids": "trg"}, tokenizer, split, log)
        result[split] = d
    if canvas == "released":
        log("data: DiffusionBERT's canvas [CLS] src trg [SEP], prompt " +
            (f"{prompt[0]!r} + src + {prompt[1]!r}" if prompt else f"none (the released code has none for {dataset!r})"))
    return DatasetDict(result)


@dataclass
class PairCollator:
    """Lays out a batch as the seq2seq canvas ``src_ids | trg [SEP] [PAD]...`` (``src_ids``: ``[CLS] src [SEP]``,
    or ``[CLS] prompt(src)`` on the released canvas).

    Every row has the same length: ``canvas_len`` (DiffuSeq's fixed canvas), or with ``canvas_len=None``
    the batch's longest ``len(src_ids) + len(trg_ids)`` (DiffusionBERT's ``pad_sequence``). Either way the
    target region is ``trg [SEP]`` followed by [PAD]s to the end of the row, and the model learns to
    generate that padding, which decides the output length (as both released collators do).
    Returns ``input_ids`` [B, L] long, ``attention_mask`` [B, L] long (all ones: padding in the target
    region is a token to predict), ``noise_mask`` [B, L] bool (the target region, positions >= src_len),
    ``src_len`` [B] long and ``trg_len`` [B] long (with the target's [SEP], without the padding).
    """

    pad_id: int
    canvas_len: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        if not rows:
            raise ValueError("PairCollator got an empty batch")
        src_len = torch.tensor([len(r["src_ids"]) for r in rows], dtype=torch.long)
        trg_len = torch.tensor([len(r["trg_ids"]) for r in rows], dtype=torch.long)
        longest = int((src_len + trg_len).max())
        L = longest if self.canvas_len is None else self.canvas_len
        if longest > L:
            raise UserError(f"a pair of {longest} tokens does not fit the canvas of {L}; tokenise with "
                            f"max_len <= canvas_len")
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            pair = list(r["src_ids"]) + list(r["trg_ids"])
            ids[i, : len(pair)] = torch.tensor(pair, dtype=torch.long)
        noise = torch.arange(L)[None] >= src_len[:, None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "noise_mask": noise,
                "src_len": src_len, "trg_len": trg_len}


def extract_target(ids: list[int] | torch.Tensor, src_len: int, sep_id: int, pad_id: int,
                   special_ids=()) -> list[int]:
    """The generated target of one canvas row ``ids`` [L]: the tokens from ``src_len`` up to (not
    including) the first [SEP] or [PAD], with any other ``special_ids`` (e.g. a left-over [MASK]) dropped."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"extract_target takes one row [L], got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    drop = set(special_ids)
    out = []
    for i in ids[src_len:]:
        if i == sep_id or i == pad_id:
            break
        if i not in drop:
            out.append(i)
    return out
