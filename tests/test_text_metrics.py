"""Tests for evaluation.text_metrics and the compute_metric.py CLI (unconditional mode).

The fast BLEU/self-BLEU are checked against literal nltk ``corpus_bleu`` loops (DiffusionBERT's
released code) on small random corpora, plus hand-computed values.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import warnings

import pytest
from nltk.translate.bleu_score import corpus_bleu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from conftest import run_script
from evaluation.text_metrics import (
    bleu,
    bleu_per_sample,
    bleu_scores_tokens,
    distinct_n_corpus,
    distinct_n_per_sentence,
    mean_length,
    self_bleu,
    self_bleu_per_sample,
    self_bleu_scores_tokens,
    summarise_unconditional,
    tokenize,
)

TOL = 1e-9
VOCAB = [f"w{i}" for i in range(8)]


# --------------------------------------------------------------------------- nltk references


def nltk_bleu_scores(hyps, refs):
    """DiffusionBERT's loop: corpus_bleu([all refs], [h]) per hypothesis."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # method0's "0 counts of n-gram overlaps" warning
        return [corpus_bleu([refs], [h]) for h in hyps]


def nltk_self_bleu_scores(sents):
    """DiffusionBERT's loop: corpus_bleu([all others], [s_i]) per sentence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [corpus_bleu([sents[:i] + sents[i + 1:]], [sents[i]]) for i in range(len(sents))]


def random_token_corpus(rng, size, tag, max_len=12):
    """Token lists over an 8-word vocab, lengths 0..max_len, with some exact duplicates.

    Also holds an empty list and a sentence of words unique to this corpus (``tag``).
    """
    sents = [[rng.choice(VOCAB) for _ in range(rng.randint(0, max_len))] for _ in range(size)]
    for _ in range(size // 5):  # repeated sentences exercise the "several hold the max" path
        sents[rng.randrange(size)] = list(sents[rng.randrange(size)])
    sents.append([])
    sents.append([f"{tag}_oov1", f"{tag}_oov2"])  # shares nothing with any other corpus
    rng.shuffle(sents)
    return sents


def random_line_corpus(rng, size):
    """Raw lines with empty lines, double spaces and padding, to test the tokenisation too."""
    lines = []
    for _ in range(size):
        words = [rng.choice(VOCAB) for _ in range(rng.randint(0, 12))]
        sep = "  " if rng.random() < 0.1 else " "
        pad = " " if rng.random() < 0.2 else ""
        lines.append(pad + sep.join(words) + pad + "\n")
    lines += ["", "\n", "w1", "w1 w2"]
    rng.shuffle(lines)
    return lines


def assert_close_lists(fast, slow):
    assert len(fast) == len(slow)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert abs(a - b) <= TOL, (i, a, b)


# --------------------------------------------------------------------------- equivalence with nltk


@pytest.mark.parametrize("seed", range(8))
def test_bleu_matches_nltk_on_random_token_corpora(seed):
    rng = random.Random(seed)
    hyps = random_token_corpus(rng, 30, "hyp")
    refs = random_token_corpus(rng, 40, "ref")
    for i in range(5):  # slices of references: long matches, clipping, brevity penalty
        ref = rng.choice(refs)
        start = rng.randint(0, len(ref))
        hyps[i] = ref[start:start + rng.randint(0, 12)]
    fast = bleu_scores_tokens(hyps, refs)
    slow = nltk_bleu_scores(hyps, refs)
    assert_close_lists(fast, slow)
    # The corpora must actually hit nltk's edge cases, or the comparison proves little:
    assert any(s == 0 for s in slow)  # no unigram match / empty hypothesis
    assert any(0 < s < 1e-100 for s in slow)  # a zero n-gram precision -> sys.float_info.min
    assert any(s > 0.1 for s in slow)  # ordinary scores


@pytest.mark.parametrize("seed", range(8))
def test_self_bleu_matches_nltk_on_random_token_corpora(seed):
    rng = random.Random(100 + seed)
    sents = random_token_corpus(rng, 30, "self")
    fast = self_bleu_scores_tokens(sents)
    slow = nltk_self_bleu_scores(sents)
    assert_close_lists(fast, slow)
    assert any(s == 0 for s in slow) and any(s > 0.1 for s in slow)


@pytest.mark.parametrize("seed", range(4))
def test_string_api_matches_nltk_with_diffusionbert_tokenisation(seed):
    rng = random.Random(200 + seed)
    samples = random_line_corpus(rng, 25)
    references = random_line_corpus(rng, 30)
    hyp_toks = [line.strip().split(" ") for line in samples]
    ref_toks = [line.strip().split(" ") for line in references]

    slow_bleu = nltk_bleu_scores(hyp_toks, ref_toks)
    assert_close_lists(bleu_per_sample(samples, references), slow_bleu)
    assert abs(bleu(samples, references) - sum(slow_bleu) / len(slow_bleu)) <= TOL

    slow_self = nltk_self_bleu_scores(hyp_toks)
    assert_close_lists(self_bleu_per_sample(samples), slow_self)
    assert abs(self_bleu(samples) - sum(slow_self) / len(slow_self)) <= TOL


def test_self_bleu_excludes_only_one_copy_of_a_duplicate():
    # "a b c d" appears twice: each copy still has the other as a perfect reference.
    # "a b c d a b" has 'a b' twice; the max over the others is 1 for ('a','b'), so it is clipped.
    sents = [["a", "b", "c", "d"], ["a", "b", "c", "d"], ["a", "b", "c", "d", "a", "b"], ["x"]]
    assert_close_lists(self_bleu_scores_tokens(sents), nltk_self_bleu_scores(sents))
    assert self_bleu_scores_tokens(sents)[0] == 1.0


# --------------------------------------------------------------------------- hand-computed BLEU


def test_bleu_identical_to_one_reference_is_one():
    # All n-gram precisions are 1 (clipped against the matching reference), and the closest
    # reference length equals the hypothesis length, so BP = exp(1 - 5/5) = 1 -> BLEU = 1.
    refs = ["x y z", "the cat sat on mats", "q"]
    assert bleu(["the cat sat on mats"], refs) == 1.0


def test_bleu_known_brevity_penalty():
    # hyp "a b c d" vs ref "a b c d e f": precisions 4/4, 3/3, 2/2, 1/1 = 1;
    # c = 4 <= r = 6 so BP = exp(1 - 6/4) = exp(-0.5) = 0.6065306597126334.
    assert abs(bleu(["a b c d"], ["a b c d e f"]) - math.exp(-0.5)) <= 1e-15
    assert abs(math.exp(-0.5) - 0.6065306597126334) <= 1e-15


def test_bleu_known_precisions():
    # hyp "a b c d e" vs ref "a b c d x": p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, BP = 1 (c = r = 5);
    # BLEU = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = (1/5) ** 0.25 = 0.6687403049764220.
    assert abs(bleu(["a b c d e"], ["a b c d x"]) - 5 ** -0.25) <= 1e-15


def test_bleu_closest_length_tie_goes_to_shorter_reference():
    # hyp length 4, references of length 3 and 5 are equally close -> nltk takes 3, so c > r and
    # BP = 1; the length-5 reference contains every n-gram, so BLEU = 1. Taking 5 would give
    # BP = exp(1 - 5/4) = 0.7788.
    assert bleu(["a b c d"], ["p q r", "a b c d x"]) == 1.0


def test_bleu_no_unigram_match_is_zero_and_mean_over_samples():
    # Sample 1 scores 1 (identical to the reference), sample 2 shares no token -> 0; mean 0.5.
    assert bleu_per_sample(["a b c d", "e f g h"], ["a b c d"]) == [1.0, 0.0]
    assert bleu(["a b c d", "e f g h"], ["a b c d"]) == 0.5


def test_bleu_empty_sample_is_one_empty_token():
    # "".strip().split(' ') == [''] (length 1); it matches only a reference holding '' as a token.
    assert tokenize("  ") == [""]
    assert bleu_per_sample([""], ["a b"]) == [0.0]
    # Against reference "a  b" (tokens a, '', b): p1 = 1/1, p2..p4 = 0/1 -> float_info.min each;
    # c = 1 < r = 3 -> BP = exp(1 - 3) = exp(-2).
    expected = math.exp(-2) * math.exp(0.75 * math.log(sys.float_info.min))
    assert bleu_per_sample([""], ["a  b"])[0] == pytest.approx(expected, rel=1e-12)


def test_self_bleu_hand_values():
    assert self_bleu(["a b c d", "a b c d"]) == 1.0
    assert self_bleu(["a b c d", "e f g h"]) == 0.0
    # Two copies score 1 against each other, the third shares nothing: (1 + 1 + 0) / 3.
    assert self_bleu(["a b c d", "a b c d", "w x y z"]) == pytest.approx(2 / 3, abs=1e-15)


def test_empty_inputs_are_rejected():
    with pytest.raises(ValueError):
        bleu(["a"], [])
    with pytest.raises(ValueError):
        bleu([], ["a"])
    with pytest.raises(ValueError):
        self_bleu(["only one"])


# --------------------------------------------------------------------------- distinct-n / length


def test_distinct_n_hand_examples():
    samples = ["a a b", "a  b "]  # whitespace tokens: [a, a, b], [a, b]
    # unigrams: per sentence (2/3 + 2/2) / 2 = 5/6; pooled: {a, b} of 5 -> 2/5.
    assert distinct_n_per_sentence(samples, 1) == pytest.approx(5 / 6, abs=1e-15)
    assert distinct_n_corpus(samples, 1) == pytest.approx(2 / 5, abs=1e-15)
    # bigrams: sentence 1 (a a), (a b) -> 1, sentence 2 (a b) -> 1; pooled {aa, ab} of 3 -> 2/3.
    assert distinct_n_per_sentence(samples, 2) == 1.0
    assert distinct_n_corpus(samples, 2) == pytest.approx(2 / 3, abs=1e-15)
    # trigrams: only sentence 1 has one (it is not averaged in as 0 for sentence 2).
    assert distinct_n_per_sentence(samples, 3) == 1.0
    assert distinct_n_corpus(samples, 3) == 1.0
    # 4-grams: none anywhere -> 0.0 by convention.
    assert distinct_n_per_sentence(samples, 4) == 0.0
    assert distinct_n_corpus(samples, 4) == 0.0


def test_distinct_corpus_does_not_span_samples():
    # Pooled bigrams are (a b) and (a b): the (b a) across the boundary must not be counted.
    assert distinct_n_corpus(["a b", "a b"], 2) == 0.5
    with pytest.raises(ValueError):
        distinct_n_corpus(["a"], 0)


def test_mean_length_uses_whitespace_tokens():
    assert mean_length(["a b", "", "  c  d e "]) == pytest.approx(5 / 3, abs=1e-15)


def test_summarise_unconditional_keys_and_values():
    samples = ["a b c d", "a b c d e", "x y"]
    refs = ["a b c d e f", "x y z"]
    out = summarise_unconditional(samples, refs)
    assert set(out) == {"bleu", "self_bleu", "dist_1", "dist_2", "dist_3", "dist_4",
                        "dist_1_per_sentence", "mean_length", "num_samples", "num_references"}
    assert out["bleu"] == bleu(samples, refs)
    assert out["self_bleu"] == self_bleu(samples)
    assert out["dist_2"] == distinct_n_corpus(samples, 2)
    assert out["dist_1_per_sentence"] == distinct_n_per_sentence(samples, 1)
    assert out["mean_length"] == pytest.approx(11 / 3)
    assert (out["num_samples"], out["num_references"]) == (3, 2)


# --------------------------------------------------------------------------- CLI


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


@pytest.fixture
def files(tmp_path):
    samples = write(tmp_path / "samples.txt", "a b c d\nthe cat sat\n\nw1 w2 w3 w4 w5\na b c d\n")
    refs = write(tmp_path / "refs.txt", "a b c d e f\n\nthe cat sat on the mat\nw1 w2 w3\n")
    return samples, refs


def stderr_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_cli_writes_json_matching_the_functions(files, capsys):
    samples, refs = files
    assert run_script("compute_metric.py", "--samples", samples, "--references", refs) == 0
    captured = capsys.readouterr()
    assert "bleu" in captured.out and "took" in captured.out
    # The empty sample line is reported (and kept), the empty reference line is dropped.
    assert "1 of 5 sample lines are empty" in captured.err

    with open(samples + ".metrics.json", encoding="utf-8") as f:
        report = json.load(f)
    expected = summarise_unconditional(
        ["a b c d", "the cat sat", "", "w1 w2 w3 w4 w5", "a b c d"],
        ["a b c d e f", "the cat sat on the mat", "w1 w2 w3"])
    assert report["metrics"] == pytest.approx(expected, abs=1e-12)
    assert report["metrics"]["num_samples"] == 5 and report["metrics"]["num_references"] == 3
    assert report["mode"] == "unconditional"
    assert report["inputs"]["samples"] == samples and report["inputs"]["references"] == refs
    assert report["inputs"]["empty_sample_lines_in_file"] == 1
    assert report["inputs"]["empty_reference_lines_dropped"] == 1
    assert "split(' ')" in report["conventions"]
    # Atomic write leaves no temp file behind.
    assert sorted(os.listdir(os.path.dirname(samples))) == [
        "refs.txt", "samples.txt", "samples.txt.metrics.json"]


def test_cli_refuses_to_overwrite_without_flag(files, capsys):
    samples, refs = files
    out = samples + ".custom.json"
    args = ["--samples", samples, "--references", refs, "--out", out]
    assert run_script("compute_metric.py", *args) == 0
    capsys.readouterr()
    with open(out, encoding="utf-8") as f:
        first = f.read()

    assert run_script("compute_metric.py", *args + ["--max_references", "1"]) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: output file") and "--overwrite" in err[0]
    with open(out, encoding="utf-8") as f:
        assert f.read() == first  # untouched

    assert run_script("compute_metric.py", *args + ["--max_references", "1", "--overwrite"]) == 0
    with open(out, encoding="utf-8") as f:
        assert json.load(f)["metrics"]["num_references"] == 1


@pytest.mark.parametrize("case, content, message", [
    ("missing", None, "does not exist"),
    ("empty", "", "has no non-empty lines"),
    ("blank", "\n  \n\n", "has no non-empty lines"),
    ("latin1", "caf\xe9 au lait\n".encode("latin-1"), "is not valid UTF-8"),
])
def test_cli_bad_samples_file_is_one_error_line(tmp_path, files, capsys, case, content, message):
    _, refs = files
    path = tmp_path / f"{case}.txt"
    if content is not None:
        write(path, content)
    assert run_script("compute_metric.py", "--samples", str(path), "--references", refs) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: samples file {path} {message}")
    assert not os.path.exists(str(path) + ".metrics.json")


def test_cli_subsets_are_seeded(files, tmp_path, capsys):
    samples, refs = files

    def run(seed, name):
        out = str(tmp_path / name)
        assert run_script("compute_metric.py", "--samples", samples, "--references", refs, "--out", out,
                                    "--max_samples", "3", "--max_references", "2",
                                    "--seed", str(seed)) == 0
        with open(out, encoding="utf-8") as f:
            return json.load(f)["metrics"]

    first, again = run(7, "a.json"), run(7, "b.json")
    assert first == again
    assert (first["num_samples"], first["num_references"]) == (3, 2)


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    missing = str(tmp_path / "nope.txt")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "compute_metric.py"),
         "--samples", missing, "--references", missing],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: samples file {missing} does not exist"]
    assert "Traceback" not in proc.stderr
