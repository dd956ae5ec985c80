"""Metrics for unconditional text generation, following DiffusionBERT's ``compute_metric.py``.

Conventions (chosen to reproduce the released numbers, not because they are ideal):

* **BLEU tokenisation**: ``line.strip().split(' ')``. A single-space split, so an empty line
  becomes the one-token sentence ``['']`` and a double space yields an ``''`` token.
* **BLEU** of samples against a reference set: for every sample ``h`` the score is
  ``nltk.translate.bleu_score.corpus_bleu([refs], [h])`` with ``refs`` the *whole* reference
  set, weights ``(0.25,) * 4`` and no smoothing; the reported number is the mean over samples.
* **self-BLEU**: the same, with sample ``i`` as hypothesis and all *other* samples as
  references, averaged over ``i``.
* **distinct-n / mean length** use whitespace tokens (``str.split()``), as DiffusionBERT's
  ``dist1``/``div4`` do.

Calling nltk like that costs O(samples x references) Counter work per n-gram order. The
functions here compute the *same* floats with precomputed statistics:

* the clipped count of an n-gram is ``min(hyp count, max over references of its count)`` and
  that max does not depend on the hypothesis, so it is computed once per order;
* the brevity penalty needs the reference length closest to the hypothesis length (ties go to
  the shorter one), found by bisection in the sorted distinct lengths;
* for self-BLEU the max must exclude sample ``i`` itself, so each n-gram keeps its largest
  count, how many samples hold it and the second largest value; lengths are kept as a
  multiset and one copy of ``len(sample_i)`` is set aside.

nltk's edge cases are kept: no unigram match gives exactly 0; a zero higher-order precision is
replaced by ``sys.float_info.min`` (SmoothingFunction.method0, whose warning is not emitted);
an order with no hypothesis n-grams has denominator 1. The floating-point operations are the
ones nltk performs, so per-sample scores agree with nltk bit for bit in practice.
"""
from __future__ import annotations

import math
import sys
from bisect import bisect_left
from collections import Counter
from typing import Iterable, Sequence

MAX_ORDER = 4
# nltk's default corpus_bleu weights; the code below assumes uniform weights of this length.
WEIGHTS = (0.25,) * MAX_ORDER

CONVENTIONS = (
    "BLEU/self-BLEU: DiffusionBERT unconditional convention: tokens = line.strip().split(' '); "
    "per sample nltk corpus_bleu([all references], [sample]) (self-BLEU: references = all other "
    "samples), weights (0.25,)*4, no smoothing (method0), mean over samples. "
    "dist_n: unique/total n-grams over all samples pooled (div-n); dist_1_per_sentence: "
    "per-sentence unique/total averaged over sentences with >= 1 n-gram; distinct and "
    "mean_length use str.split() whitespace tokens."
)

Tokens = Sequence[str]
NGram = tuple


# --------------------------------------------------------------------------- tokenisation


def tokenize(line: str) -> list[str]:
    """BLEU tokenisation: ``line.strip().split(' ')`` (empty line -> ``['']``)."""
    return line.strip().split(" ")


def ngram_counts(tokens: Tokens, n: int) -> Counter:
    """Counts of the contiguous n-grams (tuples) of ``tokens``; empty if ``len(tokens) < n``."""
    return Counter(zip(*(tokens[i:] for i in range(n))))


# --------------------------------------------------------------------------- shared BLEU core


def _closest_length(sorted_lengths: Sequence[int], hyp_len: int) -> int:
    """Length in ``sorted_lengths`` (ascending, distinct, non-empty) closest to ``hyp_len``.

    Ties go to the shorter length, as in nltk's ``closest_ref_length`` (key ``(|r - h|, r)``).
    """
    i = bisect_left(sorted_lengths, hyp_len)
    # Only the largest length below hyp_len and the smallest at/above it can be closest.
    candidates = sorted_lengths[max(0, i - 1): i + 1]
    return min(candidates, key=lambda r: (abs(r - hyp_len), r))


def _bleu_from_stats(hyp_len: int, numerators: Sequence[int], denominators: Sequence[int],
                     closest_ref_len: int) -> float:
    """Single-hypothesis ``corpus_bleu`` from clipped counts, mirroring nltk's arithmetic."""
    # nltk returns 0 before smoothing when no unigram matches (covers hyp_len == 0 too).
    if numerators[0] == 0:
        return 0.0
    if hyp_len > closest_ref_len:
        bp = 1.0
    else:
        bp = math.exp(1 - closest_ref_len / hyp_len)
    # method0: a zero precision becomes the smallest positive float, so log() stays finite.
    # num / den is what float(Fraction(num, den)) gives (int true division is exactly rounded).
    precisions = [num / den if num != 0 else sys.float_info.min
                  for num, den in zip(numerators, denominators)]
    return bp * math.exp(math.fsum(w * math.log(p) for w, p in zip(WEIGHTS, precisions) if p > 0))


def _mean(values: Sequence[float]) -> float:
    """Mean accumulated left to right, as the original ``res += ...; res / len`` loop does."""
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


# --------------------------------------------------------------------------- BLEU vs references


def bleu_scores_tokens(hypotheses: Sequence[Tokens], references: Sequence[Tokens]) -> list[float]:
    """Per-hypothesis ``corpus_bleu([references], [h])`` for tokenised inputs.

    Args:
        hypotheses: token lists (may be empty lists).
        references: the shared reference set, token lists; must be non-empty.

    Returns:
        One float per hypothesis, equal to nltk's value.
    """
    if len(references) == 0:
        raise ValueError("BLEU needs at least one reference")
    # Max count of each n-gram over the reference set: independent of the hypothesis.
    max_ref_counts = []
    for n in range(1, MAX_ORDER + 1):
        best: dict[NGram, int] = {}
        for ref in references:
            for gram, count in ngram_counts(ref, n).items():
                if count > best.get(gram, 0):
                    best[gram] = count
        max_ref_counts.append(best)
    ref_lengths = sorted({len(ref) for ref in references})

    scores = []
    for hyp in hypotheses:
        numerators, denominators = [], []
        for n, best in enumerate(max_ref_counts, start=1):
            counts = ngram_counts(hyp, n)
            numerators.append(sum(min(c, best.get(g, 0)) for g, c in counts.items()))
            denominators.append(max(1, sum(counts.values())))
        scores.append(_bleu_from_stats(len(hyp), numerators, denominators,
                                       _closest_length(ref_lengths, len(hyp))))
    return scores


def bleu_per_sample(samples: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-sample BLEU of ``samples`` against the whole ``references`` set (strings in)."""
    return bleu_scores_tokens([tokenize(s) for s in samples], [tokenize(r) for r in references])


def bleu(samples: Sequence[str], references: Sequence[str]) -> float:
    """Mean over samples of per-sample BLEU against all references (DiffusionBERT's BLEU)."""
    if len(samples) == 0:
        raise ValueError("BLEU needs at least one sample")
    return _mean(bleu_per_sample(samples, references))


# --------------------------------------------------------------------------- self-BLEU


class _TopTwo:
    """Per n-gram: largest count over sentences, how many sentences hold it, second largest."""

    __slots__ = ("first", "holders", "second")

    def __init__(self) -> None:
        self.first = 0
        self.holders = 0
        self.second = 0

    def add(self, count: int) -> None:
        if count > self.first:
            self.second = self.first
            self.first, self.holders = count, 1
        elif count == self.first:
            self.holders += 1
        elif count > self.second:
            self.second = count

    def max_excluding(self, own_count: int) -> int:
        """Max over all sentences but one whose count is ``own_count``."""
        if own_count < self.first or self.holders >= 2:
            return self.first
        return self.second


def _closest_length_excluding(sorted_lengths: Sequence[int], length_counts: Counter,
                              hyp_len: int) -> int:
    """Closest length once one copy of ``hyp_len`` is removed from the length multiset."""
    if length_counts[hyp_len] >= 2:
        return hyp_len  # another sentence has the same length: distance 0
    j = bisect_left(sorted_lengths, hyp_len)  # sorted_lengths[j] == hyp_len
    candidates = sorted_lengths[max(0, j - 1): j] + sorted_lengths[j + 1: j + 2]
    return min(candidates, key=lambda r: (abs(r - hyp_len), r))


def self_bleu_scores_tokens(sentences: Sequence[Tokens]) -> list[float]:
    """Per-sentence ``corpus_bleu([others], [s_i])`` for tokenised inputs (needs >= 2 sentences)."""
    if len(sentences) < 2:
        raise ValueError("self-BLEU needs at least two samples")
    counts_by_order = []  # [order][sentence] -> Counter
    tops_by_order = []  # [order] -> {ngram: _TopTwo}
    for n in range(1, MAX_ORDER + 1):
        counts = [ngram_counts(s, n) for s in sentences]
        tops: dict[NGram, _TopTwo] = {}
        for c in counts:
            for gram, k in c.items():
                top = tops.get(gram)
                if top is None:
                    top = tops[gram] = _TopTwo()
                top.add(k)
        counts_by_order.append(counts)
        tops_by_order.append(tops)
    length_counts = Counter(len(s) for s in sentences)
    sorted_lengths = sorted(length_counts)

    scores = []
    for i, sent in enumerate(sentences):
        numerators, denominators = [], []
        for counts, tops in zip(counts_by_order, tops_by_order):
            own = counts[i]
            numerators.append(sum(min(k, tops[g].max_excluding(k)) for g, k in own.items()))
            denominators.append(max(1, sum(own.values())))
        closest = _closest_length_excluding(sorted_lengths, length_counts, len(sent))
        scores.append(_bleu_from_stats(len(sent), numerators, denominators, closest))
    return scores


def self_bleu_per_sample(samples: Sequence[str]) -> list[float]:
    """Per-sample BLEU of each sample against all the other samples (strings in)."""
    return self_bleu_scores_tokens([tokenize(s) for s in samples])


def self_bleu(samples: Sequence[str]) -> float:
    """Mean self-BLEU (each sample vs all others), DiffusionBERT's unconditional convention."""
    return _mean(self_bleu_per_sample(samples))


# --------------------------------------------------------------------------- diversity / length


def _whitespace_ngrams(sample: str, n: int) -> list[NGram]:
    tokens = sample.split()
    return list(zip(*(tokens[i:] for i in range(n))))


def _check_order(n: int) -> None:
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}")


def distinct_n_per_sentence(samples: Iterable[str], n: int) -> float:
    """Unique/total n-grams per sentence, averaged over sentences with >= 1 n-gram (DiffuSeq dist-1).

    Whitespace tokens. Sentences too short for an n-gram are skipped (not counted as 0);
    returns 0.0 if no sentence has one.
    """
    _check_order(n)
    ratios = []
    for sample in samples:
        grams = _whitespace_ngrams(sample, n)
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return _mean(ratios) if ratios else 0.0


def distinct_n_corpus(samples: Iterable[str], n: int) -> float:
    """Unique/total n-grams pooled over all samples (div-n); n-grams never span two samples.

    Whitespace tokens; returns 0.0 if there is no n-gram at all.
    """
    _check_order(n)
    pooled: list[NGram] = []
    for sample in samples:
        pooled.extend(_whitespace_ngrams(sample, n))
    return len(set(pooled)) / len(pooled) if pooled else 0.0


def mean_length(samples: Sequence[str]) -> float:
    """Mean number of whitespace tokens (``str.split()``) per sample."""
    if len(samples) == 0:
        raise ValueError("mean length needs at least one sample")
    return _mean([len(s.split()) for s in samples])


# --------------------------------------------------------------------------- summary


def summarise_unconditional(samples: list[str], references: list[str]) -> dict:
    """All unconditional-generation metrics in one dict.

    Keys: ``bleu``, ``self_bleu``, ``dist_1``..``dist_4`` (corpus-pooled),
    ``dist_1_per_sentence``, ``mean_length``, ``num_samples``, ``num_references``.
    Needs >= 1 reference and >= 2 samples (self-BLEU).
    """
    summary = {
        "bleu": bleu(samples, references),
        "self_bleu": self_bleu(samples),
    }
    for n in range(1, MAX_ORDER + 1):
        summary[f"dist_{n}"] = distinct_n_corpus(samples, n)
    summary["dist_1_per_sentence"] = distinct_n_per_sentence(samples, 1)
    summary["mean_length"] = mean_length(samples)
    summary["num_samples"] = len(samples)
    summary["num_references"] = len(references)
    return summary
