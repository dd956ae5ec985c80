"""compute_metric.py --mode infill: the scores of filled templates, against values counted by hand."""
from __future__ import annotations

import json

import pytest

from evaluation.infill import SLOT, make_templates, score_fills
from tests.conftest import run_script

TEMPLATES = ["a [MASK] c", "[MASK] [MASK] f g", "h [MASK]"]
REFS = ["a b c", "d e f g", "h i"]
# line 1: slot right; line 2: one slot of two right; line 3: given word changed and one word too many
FILLS = ["a b c", "d x f g", "H i j"]


def test_scores_counted_by_hand():
    m = score_fills(TEMPLATES, FILLS, REFS)
    assert m == {"lines": 3, "given_kept": 2 / 3, "length_kept": 2 / 3, "slots": 4, "slot_accuracy": 3 / 4,
                 "line_exact": 1 / 3}


def test_misaligned_inputs_are_refused():
    with pytest.raises(ValueError, match="align"):
        score_fills(TEMPLATES, FILLS[:2], REFS)
    with pytest.raises(ValueError, match="reference 0 does not fit"):
        score_fills(TEMPLATES, FILLS, ["z b c", *REFS[1:]])


def test_templates_mask_the_fraction_asked_for_and_repeat():
    lines = [" ".join(f"w{j}" for j in range(n)) for n in (1, 4, 10, 7)]
    a, b = make_templates(lines, 0.3, seed=5), make_templates(lines, 0.3, seed=5)
    assert a == b and a != make_templates(lines, 0.3, seed=6)
    for line, tpl in zip(lines, a):
        words, slots = line.split(), tpl.split()
        assert len(slots) == len(words)
        assert slots.count(SLOT) == max(1, round(0.3 * len(words)))
        assert all(s in (SLOT, w) for s, w in zip(slots, words))


def test_cli_writes_the_scores_and_refuses_a_missing_template_file(tmp_path, capsys):
    for name, lines in (("t.txt", TEMPLATES), ("r.txt", REFS), ("f.txt", FILLS)):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.json"
    assert run_script("compute_metric.py", "--mode", "infill", "--samples", str(tmp_path / "f.txt"), "--templates",
                      str(tmp_path / "t.txt"), "--references", str(tmp_path / "r.txt"), "--out", str(out)) == 0
    assert json.loads(out.read_text())["metrics"]["slot_accuracy"] == 0.75
    assert run_script("compute_metric.py", "--mode", "infill", "--samples", str(tmp_path / "f.txt"), "--templates",
                      str(tmp_path / "none.txt"), "--references", str(tmp_path / "r.txt"),
                      "--out", str(tmp_path / "m2.json")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "templates file" in err[0] and "does not exist" in err[0]
