"""The synthetic language and seq2seq task (textdata/synthetic.py) against brute force."""
import itertools
import json
import math

import numpy as np
import pytest

from textdata.synthetic import (SPECIALS, SyntheticLanguage, bigram_tv, bijection, distinct_fraction,
                                reverse_map_pairs, score, write_lm_folder, write_seq2seq_folder, write_tokenizer)


@pytest.fixture(scope="module")
def tiny():
    return SyntheticLanguage.generate(seed=3, vocab_size=4, branching=2, min_len=1, max_len=4)


def _enumerate(lang):
    """Every sequence of every possible length with its probability, straight from the tables."""
    out = {}
    for n in range(1, len(lang.length_probs)):
        for ids in itertools.product(range(lang.vocab_size), repeat=n):
            p = lang.length_probs[n] * lang.start[ids[0]]
            for a, b in zip(ids, ids[1:]):
                p *= lang.trans[a, b]
            if p > 0:
                out[tuple(lang.words[i] for i in ids)] = p
    return out


def test_tables_are_distributions(tiny):
    assert np.allclose(tiny.trans.sum(1), 1) and np.isclose(tiny.start.sum(), 1)
    assert np.isclose(tiny.length_probs.sum(), 1) and tiny.length_probs[0] == 0
    assert ((tiny.trans > 0).sum(1) == 2).all()  # branching


def test_entropy_and_log_prob_match_enumeration(tiny):
    seqs = _enumerate(tiny)
    p = np.array(list(seqs.values()))
    assert math.isclose(p.sum(), 1, rel_tol=1e-12)
    h = float(-(p * np.log(p)).sum())
    ent = tiny.entropy()
    assert math.isclose(ent["per_sequence"], h, rel_tol=1e-10)
    n = np.array([len(s) for s in seqs])
    assert math.isclose(ent["mean_length"], float((p * n).sum()), rel_tol=1e-12)
    h_len = float(-sum(q * math.log(q) for q in tiny.length_probs if q > 0))
    assert math.isclose(ent["length"], h_len, rel_tol=1e-12)
    for s, q in seqs.items():
        assert math.isclose(tiny.log_prob(list(s)), math.log(q), rel_tol=1e-10)


def test_unigram_matches_enumeration(tiny):
    counts = np.zeros(tiny.vocab_size)
    for s, q in _enumerate(tiny).items():
        for w in s:
            counts[tiny.index[w]] += q
    assert np.allclose(tiny.unigram(), counts / counts.sum())


def test_samples_follow_the_probabilities(tiny):
    seqs = _enumerate(tiny)
    draws = tiny.sample(20000, seed=5)
    freq = {}
    for s in draws:
        freq[tuple(s)] = freq.get(tuple(s), 0) + 1
    assert set(freq) <= set(seqs)
    for s, q in seqs.items():
        sd = math.sqrt(q * (1 - q) / len(draws))
        assert abs(freq.get(s, 0) / len(draws) - q) < 5 * sd + 1e-4, s
    assert tiny.sample(30, seed=5) == tiny.sample(30, seed=5)


def test_forbidden_and_invalid(tiny):
    a = tiny.words[0]
    zero = int(np.nonzero(tiny.trans[0] == 0)[0][0])
    bad = [a, tiny.words[zero]]
    assert tiny.forbidden_transitions(bad) == 1 and tiny.log_prob(bad) == -math.inf
    assert tiny.forbidden_transitions(["nosuchword"]) == 1 and tiny.log_prob(["nosuchword"]) == -math.inf
    ok = tiny.sample(1, seed=0)[0]
    assert tiny.forbidden_transitions(ok) == 0
    assert tiny.log_prob(ok * 5) == -math.inf  # longer than max_len


def test_score_by_hand(tiny):
    good = tiny.sample(3, seed=9)
    lines = [" ".join(s) for s in good] + ["nosuchword"]
    res = score(tiny, lines)
    want = -sum(tiny.log_prob(s) for s in good) / sum(len(s) for s in good)
    lp = [math.log(q) for q in (_enumerate(tiny)[tuple(s)] for s in good)]
    assert math.isclose(res["nll_per_token"], -sum(lp) / sum(len(s) for s in good), rel_tol=1e-10)
    assert math.isclose(res["nll_per_token"], want, rel_tol=1e-10)
    assert res["scored"] == 3 and res["invalid_fraction"] == 0.25 and res["forbidden_fraction"] == 0.25


def test_expected_bigrams_match_enumeration(tiny):
    """Every sequence's transitions (start, pairs, end) weighted by its probability, over the expected count."""
    v = tiny.vocab_size
    counts, events = np.zeros((v + 1, v + 1)), 0.0
    for s, q in _enumerate(tiny).items():
        ids = [v] + [tiny.index[w] for w in s] + [v]
        for a, b in zip(ids, ids[1:]):
            counts[a, b] += q
        events += q * (len(s) + 1)
    assert np.allclose(tiny.expected_bigrams(), counts / events, atol=1e-14)
    longer = SyntheticLanguage.generate(seed=4, vocab_size=3, branching=2, min_len=2, max_len=6)
    counts, events = np.zeros((4, 4)), 0.0
    for s, q in _enumerate(longer).items():
        ids = [3] + [longer.index[w] for w in s] + [3]
        for a, b in zip(ids, ids[1:]):
            counts[a, b] += q
        events += q * (len(s) + 1)
    assert np.allclose(longer.expected_bigrams(), counts / events, atol=1e-14)


@pytest.fixture(scope="module")
def by_hand():
    """a, b; start 1/2 each; a -> b always, b -> a or b evenly; one or two words evenly. Its sequences: a, b
    (1/4 each), a b (1/4), b a, b b (1/8 each); E[n] + 1 = 2.5 transitions, so F: start->a .2, start->b .2,
    a->end .15, b->end .25, a->b .1, b->a .05, b->b .05."""
    return SyntheticLanguage(["a", "b"], np.array([0.5, 0.5]), np.array([[0.0, 1.0], [0.5, 0.5]]),
                             np.array([0.0, 0.5, 0.5]))


def test_expected_bigrams_by_hand(by_hand):
    want = np.array([[0, 0.1, 0.15], [0.05, 0.05, 0.25], [0.2, 0.2, 0]])
    assert np.allclose(by_hand.expected_bigrams(), want, atol=1e-15)


def test_bigram_tv_by_hand(by_hand):
    # "a b", "a": start->a 2/5, a->b 1/5, b->end 1/5, a->end 1/5;
    # |.4-.2| + |0-.2| + |.2-.15| + |.2-.25| + |.2-.1| + .05 + .05 = .7
    assert math.isclose(bigram_tv(by_hand, ["a b", "a"]), 0.35, abs_tol=1e-12)
    # "a zz": start->a, a->unknown, unknown->end, 1/3 each: |1/3-.2| + 1/3 + 1/3 + (1 - .2) unseen = 1.6
    assert math.isclose(bigram_tv(by_hand, ["a zz"]), 0.8, abs_tol=1e-12)
    # the language's own frequencies exactly: 20 lines in the proportions of F's sequences
    lines = ["a"] * 4 + ["b"] * 4 + ["a b"] * 4 + ["b a"] * 2 + ["b b"] * 2
    assert math.isclose(bigram_tv(by_hand, lines), 0.0, abs_tol=1e-12)
    # "b b b": start->b 1/4, b->b 1/2, b->end 1/4: .2 (start->a) + .05 + .15 (a->end) + 0 + .1 + .05 + .45 = 1
    assert math.isclose(bigram_tv(by_hand, ["b b b"]), 0.5, abs_tol=1e-12)


def test_distinct_fraction_by_hand():
    assert distinct_fraction(["a b", "a  b", "a", "b"]) == 0.75
    assert distinct_fraction(["a"] * 5) == 0.2
    assert math.isnan(distinct_fraction([]))


def test_save_load_round_trip(tiny, tmp_path):
    path = tiny.save(str(tmp_path / "language.json"))
    back = SyntheticLanguage.load(path)
    assert back.words == tiny.words and np.array_equal(back.trans, tiny.trans)
    assert np.array_equal(back.start, tiny.start) and np.array_equal(back.length_probs, tiny.length_probs)
    assert json.load(open(path))["entropy"]["per_sequence"] == pytest.approx(tiny.entropy()["per_sequence"])


def test_generation_is_seeded_and_zipf_like():
    a = SyntheticLanguage.generate(seed=1, vocab_size=200, branching=6)
    b = SyntheticLanguage.generate(seed=1, vocab_size=200, branching=6)
    assert a.words == b.words and np.array_equal(a.trans, b.trans)
    assert len(set(a.words)) == 200 and all(w.isalpha() and w.islower() for w in a.words)
    f = np.sort(a.unigram())[::-1]
    assert f[0] > 20 * f[100]  # a long tail, as in real text


def test_reverse_map_pairs(tiny):
    lang = SyntheticLanguage.generate(seed=4, vocab_size=30, branching=4, min_len=3, max_len=25)
    m = bijection(lang)
    assert sorted(m.values()) == sorted(lang.words) and all(k != v for k, v in m.items())
    pairs = reverse_map_pairs(lang, 200, seed=1, min_len=5, max_len=20)
    assert len(pairs) == 200
    for p in pairs:
        src = p["src"].split()
        assert 5 <= len(src) <= 20
        assert p["trg"].split() == [m[w] for w in src[::-1]]


def test_tokenizer_directory_loads_one_token_per_word(tmp_path):
    from transformers import AutoConfig, AutoTokenizer
    lang = SyntheticLanguage.generate(seed=2, vocab_size=50)
    d = write_tokenizer(lang.words, str(tmp_path / "tok"), hidden_size=32, num_layers=1, num_heads=2)
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == 50 + len(SPECIALS) and tok.mask_token_id is not None
    line = " ".join(lang.sample(1, seed=0)[0])
    ids = tok(line)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) == len(line.split()) + 2
    assert tok.decode(ids[1:-1]) == line
    assert AutoConfig.from_pretrained(d).vocab_size == len(tok)


def test_folders(tmp_path):
    lang = SyntheticLanguage.generate(seed=2, vocab_size=40)
    res = write_lm_folder(lang, str(tmp_path / "lm"), 50, 10, 20)
    lines = (tmp_path / "lm" / "test.txt").read_text().splitlines()
    assert len(lines) == 20 and res["forbidden_fraction"] == 0 and res["invalid_fraction"] == 0
    write_seq2seq_folder(lang, str(tmp_path / "s2s"), 30, 5, 5)
    rows = [json.loads(x) for x in (tmp_path / "s2s" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and set(rows[0]) == {"src", "trg"}


def test_ratio_standard_error_by_hand():
    from common.stats import ratio_standard_error
    # x = (2, 4, 9), n = (1, 2, 3): r = 15/6 = 2.5; residuals (-0.5, -1, 1.5), mean 0, sample var
    # (0.25 + 1 + 2.25) / 2 = 1.75; se = sqrt(1.75) / sqrt(3) / 2
    assert math.isclose(ratio_standard_error([2, 4, 9], [1, 2, 3]), math.sqrt(1.75) / math.sqrt(3) / 2)
    assert ratio_standard_error([1.0], [2]) == 0.0


def test_compute_metric_synthetic_reports_tv_and_distinct(by_hand, tmp_path):
    """The CLI's new numbers are the hand-counted ones; the references' TV is over as many lines as the samples."""
    from tests.conftest import run_script
    by_hand.save(str(tmp_path / "language.json"))
    (tmp_path / "s.txt").write_text("a b\na\n")
    (tmp_path / "r.txt").write_text("b b b\na\nb\n")
    out = tmp_path / "m.json"
    assert run_script("compute_metric.py", "--mode", "synthetic", "--samples", str(tmp_path / "s.txt"), "--language",
                      str(tmp_path / "language.json"), "--references", str(tmp_path / "r.txt"), "--out", str(out)) == 0
    m = json.loads(out.read_text())["metrics"]
    assert math.isclose(m["sample_bigram_tv"], 0.35, abs_tol=1e-12) and m["sample_distinct_fraction"] == 1.0
    # "b b b", "a": 6 transitions; start->b, b->end, start->a, a->end 1/6 each and b->b 1/3:
    # |1/6-.2| x 2 + |1/6-.15| + |1/6-.25| + |1/3-.05| + .1 (a->b) + .05 (b->a) = 0.6
    assert m["reference_bigram_tv_lines"] == 2
    assert math.isclose(m["reference_bigram_tv"], 0.3, abs_tol=1e-12)
    assert m["reference_distinct_fraction"] == 1.0
