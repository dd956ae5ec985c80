"""Bad lines in data files: finding them (``FILE:LINE: reason``) and, with ``--skip_bad_lines``,
skipping them with a count in the log instead of stopping.

Both loaders check files in bytes, line by line, with a ``problem(raw) -> reason | None``
function of their own (``textdata.lm``: UTF-8 only; ``conditional_data.pairs``: one DiffuSeq object
per line). Without ``--skip_bad_lines`` the first bad line is an error. With it, one log line per
file gives the number skipped and the first few, and ``datasets`` reads a cleaned copy holding only
the good lines. The copy lives in the datasets cache under the source file's sha256, so the user's
file is never written and a second run reuses both the copy and datasets' cache of it.
"""
from __future__ import annotations

import codecs
import hashlib
import os

from common.errors import UserError

SKIP_HINT = "fix it, or pass --skip_bad_lines to skip bad lines (they are counted in the log)"
CLEAN_VERSION = "clean-v1"  # bump when what counts as a bad line changes, to invalidate the copies
SHOW = 3  # bad lines quoted in the log line of a file


def read_lines(path: str):
    """(lineno, raw bytes) for every line of ``path``, 1-based; the UTF-8 byte-order mark of line 1 is
    dropped. Lines end at ``\\n`` only, so the numbers are those an editor shows."""
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                yield lineno, raw
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def decode(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) for a UTF-8 line; (None, reason) for one that is not."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"


def utf8_problem(raw: bytes) -> str | None:
    return decode(raw)[1]


def first_problem(path: str, problem) -> str | None:
    """``FILE:LINE: reason`` of the first bad line of ``path``, or None if there is none."""
    for lineno, raw in read_lines(path):
        reason = problem(raw)
        if reason is not None:
            return f"{path}:{lineno}: {reason}"
    return None


def cache_dir() -> str:
    import datasets
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "cleaned_data_files")


def without_bad_lines(path: str, problem, log=print) -> tuple[str, int]:
    """Drop the lines of ``path`` that ``problem`` rejects: (the file to read, its number of lines).

    That file is ``path`` itself when every line is good; otherwise a cleaned copy in
    :func:`cache_dir`, and one log line gives the count and the first :data:`SHOW` bad lines. An empty
    file, or one with no good line, is a ``UserError``.
    """
    n = n_bad = 0
    first = []
    sha = hashlib.sha256()
    for n, raw in read_lines(path):
        sha.update(raw)
        reason = problem(raw)
        if reason is not None:
            n_bad += 1
            if len(first) < SHOW:
                first.append(f"{path}:{n}: {reason}")
    if n == 0:
        raise UserError(f"{path} is empty")
    if n_bad == n:
        raise UserError(f"{path}: all {n} lines are bad, nothing is left to read (first: {first[0]})")
    if n_bad == 0:
        return path, n
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cache_dir(), f"{stem}-{sha.hexdigest()[:16]}-{CLEAN_VERSION}{os.path.splitext(path)[1]}")
    if not os.path.isfile(out):  # written once: an unchanged copy keeps datasets' cache of it valid
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            for lineno, raw in read_lines(path):
                if problem(raw) is None:
                    f.write(raw if raw.endswith(b"\n") else raw + b"\n")
        os.replace(tmp, out)
    more = f"; {n_bad - len(first)} more" if n_bad > len(first) else ""
    log(f"data: skipped {n_bad} bad line{'s' if n_bad > 1 else ''} of {n} in {path} (first: {'; '.join(first)}{more}); "
        f"reading the other {n - n_bad} from the cleaned copy {out}")
    return out, n - n_bad
