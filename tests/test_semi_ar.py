"""Semi-autoregressive sampling past the canvas (runtime.semi_ar, runtime.api, predict.py --length/--block_size).

The model is a known first-order Markov chain (start ``pi``, transitions ``P`` over made-up words): a stub
denoiser whose ``p(x0 | x_t)`` at a masked position i is the chain's law of word i given the nearest visible token
to its left j (``P^(i-j)`` from that word, or ``pi P^(i-2)`` from [CLS] at position 0): by the Markov property
that is the exact conditional given everything visible to its left. The oracles are the chain's: with a
deterministic chain every sampler must give the chain's one path; with a stochastic one a block's first word
sees its left neighbour (the last context word) from the first step to the last, so the exact samplers draw it
from ``P(a, .)`` and the join transitions' frequencies must match ``P`` within a binomial tolerance derived
below. Block counts, windows and network calls are checked against the plan worked out here by hand.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from common.errors import UserError
from runtime import api, dist
from runtime.assemble import Loaded, build_diffusion
from runtime.config import TrainConfig
from textdata.synthetic import SPECIALS

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_LEN = 10          # canvas: [CLS] + 8 words + [SEP]
W = MAX_LEN - 2       # the window: the stub's training lengths reach 8
WORDS = [f"w{k}" for k in range(6)]
NS = len(SPECIALS)    # word k is token NS + k
N_SEQ = 400
SAMPLERS = ("ours", "released", "confidence", "parallel", "remask", "first_hitting")


def matrix_powers(M: torch.Tensor, n: int) -> torch.Tensor:
    """[n + 1, K, K]: M^0 .. M^n."""
    out = [torch.eye(M.shape[0], dtype=torch.float64)]
    for _ in range(n):
        out.append(out[-1] @ M)
    return torch.stack(out)


class ChainDenoiser:
    """p_hat at the masked ``positions`` of ``x`` [B, L]: the chain given the nearest visible token to the left.
    Counts its calls and the rows it saw, and keeps every canvas it was shown (``seen``)."""

    time_agnostic = True

    def __init__(self, pi, P, tok, L: int = 64):
        self.K = P.shape[0]
        self.Pk = matrix_powers(P.double(), L)                   # [L + 1, K, K]
        self.start = torch.stack([pi.double() @ self.Pk[max(d - 1, 0)] for d in range(L + 1)])   # [L + 1, K]
        self.V, self.mask, self.cls = len(tok), tok.mask_token_id, tok.cls_token_id
        self.calls, self.rows, self.seen = 0, 0, []

    def __call__(self, x, t, attention_mask, positions):
        self.calls, self.rows = self.calls + 1, self.rows + x.shape[0]
        self.seen += x.tolist()
        B, L = x.shape
        at = torch.arange(L).expand(B, L)
        left = torch.where(x != self.mask, at, torch.zeros_like(at)).cummax(-1).values   # visible at or before i
        left = torch.cat([torch.zeros(B, 1, dtype=torch.long), left[:, :-1]], 1)          # strictly before i
        d = (at - left)[positions]                                                        # [N]
        a = x.gather(1, left)[positions]
        from_cls = a == self.cls
        word = (a - NS).clamp(0, self.K - 1)
        p = torch.where(from_cls[:, None], self.start[d], self.Pk[d, word])               # [N, K]
        logits = torch.full((p.shape[0], self.V), -math.inf, dtype=torch.float32)
        logits[:, NS:NS + self.K] = p.log().float()
        return logits


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    from textdata.synthetic import write_tokenizer
    path = write_tokenizer(WORDS, str(tmp_path_factory.mktemp("chain_tok")), hidden_size=8, num_layers=1,
                           num_heads=1, max_position=MAX_LEN)
    return AutoTokenizer.from_pretrained(path)


def model(tok, pi, P, max_len: int = MAX_LEN, trained: int = W) -> api.Model:
    """An absorbing lm checkpoint whose denoiser is the chain (T = 50, the mutual schedule), trained on lines
    of 3..``trained`` words."""
    cfg = TrainConfig(task="lm", process="absorbing", max_len=max_len, num_steps=50, schedule="mutual")
    counts = [0, 0, 0] + [1] * (trained - 2) + [0] * (max_len - 1 - trained - 1)
    run = Loaded("chain/checkpoints/best", cfg, {"derived": {"length_counts": counts}}, tok,
                 ChainDenoiser(pi, P, tok), build_diffusion(cfg, tok.mask_token_id, tok.pad_token_id))
    return api.Model(run, dist.DistInfo())


def cycle(K: int = len(WORDS)):
    """A deterministic chain: word k -> succ[k], one cycle through every word, starting at word 2."""
    succ = [3, 5, 0, 1, 2, 4]  # 2 -> 0 -> 3 -> 1 -> 5 -> 4 -> 2
    P = torch.zeros(K, K, dtype=torch.float64)
    P[torch.arange(K), torch.tensor(succ)] = 1.0
    return torch.nn.functional.one_hot(torch.tensor(2), K).double(), P, succ


def path(first: int, succ, n: int) -> list[str]:
    out = [first]
    while len(out) < n:
        out.append(succ[out[-1]])
    return [WORDS[k] for k in out]


# ---------------------------------------------------------------- the plan, worked out by hand

def test_blocks_and_windows_follow_the_plan(tok):
    """n = 30 words, window 8, blocks of 3, a prompt of 2: block 0 makes words 2..7, then 22 more in 8 blocks
    (7 of 3, one of 1): 9 blocks. Every later canvas is [CLS], the last 8 - r words made, r [MASK]s, [SEP]."""
    pi, P, succ = cycle()
    m = model(tok, pi, P)
    rows = m.lm_rows(2, 30, "w2 w0", seed=0, block_size=3)
    assert rows[0].blocks == (8, 3)
    out = m.generate(rows, m.decoding(steps=6, cache=False), seed=1, batch_size=2)
    assert out.blocks == [9, 9]
    want = path(2, succ, 30)
    assert out.texts == [" ".join(want)] * 2
    ids = [NS + WORDS.index(w) for w in want]
    cls, sep, mask = tok.cls_token_id, tok.sep_token_id, tok.mask_token_id
    seen = {tuple(c for c in row if c != tok.pad_token_id) for row in m.run.denoiser.seen}
    starts = [2, 8, 11, 14, 17, 20, 23, 26, 29]
    ends = starts[1:] + [30]
    for s, e in zip(starts, ends):      # every block's first canvas: the context and the block all masked
        lo = max(0, e - 8)
        assert (cls, *ids[lo:s], *[mask] * (e - s), sep) in seen, (s, e)
    # every canvas the network saw is one of these blocks' (some positions made): nothing else was evaluated
    shapes = {(lo_s, e) for s, e in zip(starts, ends) for lo_s in [max(0, e - 8)]}
    for c in seen:
        assert c[0] == cls and c[-1] == sep and any(len(c) == e - lo + 2 for lo, e in shapes)
    # cost: without the cache every row is evaluated at each step that still has a [MASK]; the counts agree
    assert out.row_evaluations == m.run.denoiser.rows and out.network_calls == m.run.denoiser.calls


def test_block_zero_is_the_one_canvas_sample(tok):
    """Block 0 draws what a one-canvas sample of W words draws: the first W words of a long sample are the
    --length W sample of the same seed (a stochastic chain, so the words depend on the draws)."""
    pi, P = stochastic()
    m = model(tok, pi, P)
    short = m.sample(5, steps=8, length=W, seed=3)
    long = m.sample(5, steps=8, length=3 * W, block_size=4, seed=3)
    assert [s.split()[:W] for s in long] == [s.split() for s in short]
    assert all(len(s.split()) == 3 * W for s in long)


# ---------------------------------------------------------------- the oracle: a known Markov chain

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_deterministic_chain_gives_its_one_path(tok, sampler):
    """Every sampler, from [CLS] and from a prompt: the long sequence is the chain's unique path."""
    pi, P, succ = cycle()
    m = model(tok, pi, P)
    n = 4 * MAX_LEN
    assert m.sample(3, steps=10, length=n, block_size=3, sampler=sampler, seed=0) == [" ".join(path(2, succ, n))] * 3
    # a prompt off the start distribution: the path continues from its last word (w4 -> w2 -> w0 ...)
    got = m.sample(2, steps=10, length=n, block_size=5, prompt="w1 w5 w4", sampler=sampler, seed=0)
    assert got == [" ".join(["w1", "w5"] + path(4, succ, n - 2))] * 2


def stochastic():
    """A 6-word chain with forbidden transitions (zeros), rows far from uniform and from each other."""
    P = torch.tensor([[0.6, 0.3, 0.1, 0.0, 0.0, 0.0],
                      [0.0, 0.1, 0.5, 0.4, 0.0, 0.0],
                      [0.0, 0.0, 0.2, 0.2, 0.6, 0.0],
                      [0.3, 0.0, 0.0, 0.1, 0.1, 0.5],
                      [0.7, 0.0, 0.0, 0.0, 0.2, 0.1],
                      [0.1, 0.4, 0.0, 0.0, 0.0, 0.5]], dtype=torch.float64)
    pi = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
    return pi, P


def join_pairs(texts, starts, gap: int = 1):
    """(word before, first word) at every block start after the first block; ``gap`` 2: two words back."""
    pairs = []
    for text in texts:
        w = [WORDS.index(x) for x in text.split()]
        pairs += [(w[s - gap], w[s]) for s in starts]
    return pairs


def matches_chain(pairs, P, alpha: float = 1e-3) -> bool:
    """Whether every transition frequency n(a, v) / n(a) lies within z sqrt(P (1 - P) / n(a)) of P(a, v), with z
    the two-sided normal quantile at ``alpha`` Bonferroni-split over the K^2 cells (a binomial count per cell;
    n(a) >= 100 here, so the normal approximation holds), and no pair the chain forbids."""
    K = P.shape[0]
    z = NormalDist().inv_cdf(1 - alpha / (2 * K * K))
    counts = torch.zeros(K, K, dtype=torch.float64)
    for a, v in pairs:
        counts[a, v] += 1
    n = counts.sum(1, keepdim=True)
    assert (n >= 100).all(), n.squeeze()
    tol = z * (P * (1 - P) / n).sqrt()
    return bool(((counts / n - P).abs() <= tol).all() and (counts[P == 0] == 0).all())


@pytest.mark.parametrize("sampler", ["ours", "first_hitting", "remask", "released"])
def test_stochastic_chain_joins_follow_the_chain(tok, sampler):
    """400 sequences of 34 words, window 8, blocks of 3 (10 blocks: joins at words 8, 11, ..., 32): 3,600 join
    transitions, whose frequencies match P. The samplers that draw a position's token from p_hat (ours,
    first_hitting, remask with a value-blind remasking, released at temperature 1) are exact at the join; the
    confidence rules choose positions by their drawn token, so only the deterministic test above holds there.
    The same counts two words back (a context off by one) are far from P: the test has the power to see it."""
    pi, P = stochastic()
    m = model(tok, pi, P)
    texts = m.sample(N_SEQ, steps=6, length=34, block_size=3, sampler=sampler, seed=11, batch_size=N_SEQ)
    starts = list(range(8, 34, 3))
    assert matches_chain(join_pairs(texts, starts), P)
    assert not matches_chain(join_pairs(texts, starts, gap=2), P)
    # each block draws its own numbers: two joins of one sequence after the same word agree as often as two
    # independent draws from P(a, .) would (sum_v P(a, v)^2), not always (blocks sharing their draws)
    same, expect = [], []
    for text in texts:
        joins = join_pairs([text], starts)
        for j, (a, v) in enumerate(joins):
            for b, u in joins[j + 1:]:
                if a == b:
                    same.append(float(v == u))
                    expect.append(float((P[a] ** 2).sum()))
    rate, e = sum(same) / len(same), sum(expect) / len(expect)
    # pairs share joins, so count one per sequence: 5 standard errors of a mean of N_SEQ draws
    assert abs(rate - e) <= 5 * math.sqrt(e * (1 - e) / N_SEQ), (rate, e)


@pytest.mark.parametrize("sizes", [(1, 7, 64)])
def test_batch_size_invariance_across_blocks(tok, sizes):
    """The same strings for batch sizes 1, 7 and 64, lengths mixed (one canvas and blocks), with a prompt."""
    pi, P = stochastic()
    m = model(tok, pi, P)
    runs = [m.sample(13, steps=6, length=[5, 30, 21], block_size=4, prompt="w0", seed=5, batch_size=b)
            for b in sizes]
    assert runs[0] == runs[1] == runs[2]
    assert [len(s.split()) for s in runs[0]] == [[5, 30, 21][i % 3] for i in range(13)]
    assert len(set(runs[0][1::3])) > 1  # the samples differ: the invariance is not that of a constant


def test_each_block_has_its_own_draws():
    """SampleNoise keys each block apart (block 0 as a one-canvas sample), the same whatever the batch."""
    from diffusion import SampleNoise
    a = SampleNoise(7, [3, 9], block=0).uniform(2, 1, 12)
    assert torch.equal(a, SampleNoise(7, [3, 9]).uniform(2, 1, 12))
    b1 = SampleNoise(7, [3, 9], block=1).uniform(2, 1, 12)
    assert not torch.isclose(a, b1).any()
    assert torch.equal(SampleNoise(7, [9], block=1).uniform(2, 1, 12)[0], b1[1])
    assert torch.equal(SampleNoise(7, [3, 9], block=1).rows(torch.tensor([False, True])).uniform(2, 1, 12)[0], b1[1])


# ---------------------------------------------------------------- bad input

def test_refusals(tok):
    pi, P, _ = cycle()
    m = model(tok, pi, P)
    with pytest.raises(UserError, match="block_size must be between 1 and 7, got 0"):
        m.lm_rows(1, 20, block_size=0)
    with pytest.raises(UserError, match="block_size must be between 1 and 7, got 10"):
        m.lm_rows(1, 20, block_size=MAX_LEN)
    with pytest.raises(UserError, match="block_size must be between 1 and 7, got 8"):
        m.lm_rows(1, 20, block_size=W)
    with pytest.raises(UserError, match="prompt is 5 wordpieces, longer than the context a block sees: 4"):
        m.lm_rows(1, 20, prompt="w0 w1 w2 w3 w4", block_size=4)
    assert m.lm_rows(1, 20, prompt="w0 w1 w2 w3", block_size=4)[0].blocks == (8, 4)
    with pytest.raises(UserError, match="block_size is for semi-autoregressive sampling"):
        m.lm_rows(1, 8, block_size=3)
    with pytest.raises(UserError, match="block_size is for semi-autoregressive sampling"):
        m.lm_rows(1, None, block_size=3)  # drawn lengths always fit a canvas
    # the window is the longest training line: here 6 words, below max_len - 2
    short = model(tok, pi, P, trained=6)
    assert short.lm_rows(1, 20)[0].blocks == (6, 3)
    with pytest.raises(UserError, match="between 1 and 5, got 6"):
        short.lm_rows(1, 20, block_size=6)


def test_gaussian_has_no_semi_ar(tok):
    cfg = TrainConfig(task="lm", process="gaussian", max_len=MAX_LEN, num_steps=20, emb_dim=8, hidden_size=16,
                      num_layers=1, num_heads=2, dropout=0.0, schedule="sqrt")
    run = Loaded("g/checkpoints/best", cfg, {"derived": {}}, tok, None,  # the rows are refused before a network call
                 build_diffusion(cfg, tok.mask_token_id, tok.pad_token_id))
    g = api.Model(run, dist.DistInfo())
    with pytest.raises(UserError, match="no semi-autoregressive mode"):
        g.lm_rows(1, MAX_LEN - 1)
    with pytest.raises(UserError, match="block_size is for absorbing checkpoints"):
        g.lm_rows(1, 4, block_size=2)


# ---------------------------------------------------------------- the command line

@pytest.mark.slow
def test_predict_long_length_cli(lm_run, tmp_path):
    """predict.py --length 70 on the tiny checkpoint (max_len 32): the record says how many blocks and at what
    cost; the refusals are one line each."""
    import json
    import os
    from tests.conftest import one_error_line, run_here
    _, _, run, _ = lm_run
    counts = json.load(open(os.path.join(run, "checkpoints", "best", "run_config.json")))["derived"]["length_counts"]
    window = max(i for i, c in enumerate(counts) if c)  # the longest training line
    common = ["predict.py", "--checkpoint", str(run), "--steps", "4", "--seed", "2", "--out_dir", str(tmp_path)]
    p = run_here(*common, "--num_samples", "3", "--length", "70", "--block_size", "10", "--batch_size", "2",
                 "--name", "long", cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    meta = json.load(open(tmp_path / "long.json"))
    blocks = 1 + math.ceil((70 - window) / 10)
    assert meta["semi_ar"]["window"] == window and meta["semi_ar"]["block_size"] == 10
    assert meta["semi_ar"]["blocks_per_sequence"] == blocks and meta["semi_ar"]["blocks"] == 3 * blocks
    assert meta["semi_ar"]["row_evaluations_per_sequence"] == meta["row_evaluations"] / 3
    assert 3 * blocks <= meta["row_evaluations"] <= 3 * blocks * 4  # each block's canvas: 1 to --steps calls
    assert f"{blocks} blocks per sequence (window {window}, blocks of 10)" in p.stdout
    assert len((tmp_path / "long.txt").read_text().splitlines()) == 3
    for extra, needles in ((("--length", "70", "--block_size", "0"), ("--block_size", "got 0")),
                           (("--length", "70", "--block_size", "32"), ("--block_size", "got 32")),
                           (("--length", "70", "--block_size", "10", "--prompt", "and " * (window - 9)),
                            ("--prompt", "the context a block sees")),
                           (("--length", "20", "--block_size", "10"), ("--block_size is for semi-autoregressive",)),
                           (("--template", "the [MASK]", "--block_size", "3"), ("--block_size",))):
        one_error_line(run_here(*common, *extra, cwd=str(tmp_path)), *needles)


# ---------------------------------------------------------------- scoring long synthetic text

def test_score_chain_by_hand():
    """Four lines under a 3-word chain, every number worked out by hand (ln 2 = 0.693...):
    'a b a c', join at 2: log pi(a) + log P(b|a) + log P(a|b) + log P(c|a) = 3 ln(1/2), 4 tokens;
    'b b a', join at 1: b -> b is forbidden (at the join); 'c c a', no joins: ln(1/4) + 2 ln(1/2), 3 tokens;
    'a zz', join at 1: an unknown word, forbidden (at the join). Joins: 3 transitions, 2 forbidden, the allowed
    one b -> a of probability 1; inside: 5 transitions (1/2, 1/2, 1, 1/2, 1/2), none forbidden."""
    import numpy as np
    from textdata.synthetic import SyntheticLanguage, score_chain
    lang = SyntheticLanguage(["a", "b", "c"], np.array([0.5, 0.25, 0.25]),
                             np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.5, 0.0, 0.5]]), np.array([0, 1.0]))
    r = score_chain(lang, ["a b a c", "b b a", "c c a", "a zz"], [[2], [1], [], [1]])
    ln2 = math.log(2)
    assert (r["sequences"], r["scored"], r["forbidden_fraction"]) == (4, 2, 0.5)
    assert (r["join_transitions"], r["inside_transitions"]) == (3, 5)
    assert r["join_forbidden_rate"] == pytest.approx(2 / 3) and r["inside_forbidden_rate"] == 0
    assert r["join_nll_per_transition"] == pytest.approx(0.0) and r["inside_nll_per_transition"] == pytest.approx(4 * ln2 / 5)
    assert r["nll_per_token"] == pytest.approx((3 * ln2 + 4 * ln2) / 7)
    # the allowed terms of every line: 3 ln2 over 4; ln4 + 0 over 2 (b -> b left out); 4 ln2 over 3; ln2 over 1
    assert r["nll_per_token_allowed"] == pytest.approx((3 + 2 + 4 + 1) * ln2 / (4 + 2 + 3 + 1))
    # one canvas (no joins): every transition is inside
    assert score_chain(lang, ["c c a"])["nll_per_token"] == pytest.approx(4 * ln2 / 3)


def test_compute_metric_joins(tmp_path):
    """compute_metric.py --joins reads the joins from predict.py's json and scores as score_chain (by hand above)."""
    import json
    import numpy as np
    from tests.conftest import one_error_line, run_here
    from textdata.synthetic import SyntheticLanguage
    lang = SyntheticLanguage(["ba", "be", "bi"], np.array([0.5, 0.25, 0.25]),
                             np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.5, 0.0, 0.5]]), np.array([0, 1.0]))
    lang.save(str(tmp_path / "language.json"))
    (tmp_path / "s.txt").write_text("ba be ba bi\nbe be ba\nbi bi ba\n")
    (tmp_path / "s.json").write_text(json.dumps({"semi_ar": {"joins": {"4": [2], "3": [1]}}}))
    common = ["compute_metric.py", "--mode", "synthetic", "--samples", str(tmp_path / "s.txt"), "--language",
              str(tmp_path / "language.json")]
    p = run_here(*common, "--joins", str(tmp_path / "s.json"), "--out", str(tmp_path / "m.json"), cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    m = json.load(open(tmp_path / "m.json"))
    m = m.get("metrics", m)
    # joins: be -> ba (1), be -> be (forbidden), bi -> bi (1/2); inside: 1/2, 1/2, 1, 1/2
    assert m["sample_chain_join_transitions"] == 3 and m["sample_chain_join_forbidden_rate"] == pytest.approx(1 / 3)
    assert m["sample_chain_nll_per_token"] == pytest.approx(7 * math.log(2) / 7)
    (tmp_path / "bad.json").write_text("{}")
    one_error_line(run_here(*common, "--joins", str(tmp_path / "bad.json"), "--out", str(tmp_path / "n.json"),
                            cwd=str(tmp_path)), "--joins", "no semi_ar.joins")


def test_only_length_rows_are_made_in_blocks():
    from runtime import semi_ar
    from runtime.canvas import SLOT, Row
    for row in (Row((2, SLOT, 9, SLOT, 3), blocks=(2, 1)), Row((2, 9), open=True)):  # a template; an open row
        with pytest.raises(ValueError, match="only closed rows"):
            semi_ar.generate([row], [0], None, 0, torch.device("cpu"), 0, 4)
