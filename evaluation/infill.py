"""Scores of filled templates: did the given words stay, how many slots got the held-out word, and (on the
synthetic language) the exact likelihood of the filled sentences.

A template is a line of whitespace-separated words in which ``[MASK]`` marks a slot (one word each: the
scores are exact for a word-level vocabulary, where one slot is one word). Templates, fills and the
references they were made from are aligned line by line.
"""
from __future__ import annotations

SLOT = "[MASK]"


def score_fills(templates: list[str], fills: list[str], references: list[str] | None = None) -> dict:
    """Per-line comparison of ``fills`` with ``templates`` (and the ``references`` the slots came from).

    * ``given_kept``: fraction of lines whose non-slot words are the template's, in place, with the
      template's number of words;
    * ``length_kept``: fraction of lines with the template's number of words;
    * ``slot_accuracy``: fraction of all slots (over all lines) filled with the reference's word
      (a line of another length counts its slots wrong beyond its end);
    * ``line_exact``: fraction of lines equal to their reference.
    """
    if len(fills) != len(templates) or (references is not None and len(references) != len(templates)):
        raise ValueError(f"{len(templates)} templates, {len(fills)} fills"
                         f"{'' if references is None else f', {len(references)} references'}: they must align")
    kept = same_len = slots = right = exact = 0
    for i, (tpl, fill) in enumerate(zip(templates, fills)):
        t, f = tpl.split(), fill.split()
        same_len += len(f) == len(t)
        kept += len(f) == len(t) and all(a == b for a, b in zip(t, f) if a != SLOT)
        if references is None:
            continue
        r = references[i].split()
        if len(r) != len(t) or any(a != b for a, b in zip(t, r) if a != SLOT):
            raise ValueError(f"reference {i} does not fit template {i}")
        for k, a in enumerate(t):
            if a == SLOT:
                slots += 1
                right += k < len(f) and f[k] == r[k]
        exact += f == r
    n = max(1, len(templates))
    out = {"lines": len(templates), "given_kept": kept / n, "length_kept": same_len / n}
    if references is not None:
        out |= {"slots": slots, "slot_accuracy": right / max(1, slots), "line_exact": exact / n}
    return out


def make_templates(lines: list[str], fraction: float, seed: int) -> list[str]:
    """Each line with ``round(fraction * words)`` of its words (at least one) replaced by ``[MASK]``, at
    positions drawn uniformly without replacement by a generator seeded with ``(seed, line index)``."""
    import random
    out = []
    for i, line in enumerate(lines):
        words = line.split()
        k = min(len(words), max(1, round(fraction * len(words))))
        picked = set(random.Random(f"{seed}:{i}").sample(range(len(words)), k))
        out.append(" ".join(SLOT if j in picked else w for j, w in enumerate(words)))
    return out
