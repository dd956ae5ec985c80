"""MDLM's continuous-time objective (diffusion/mdlm.py, docs/algorithms.md §1.14) against oracles that do not use it:

* the discrete T-step NELBO, enumerated exactly on a tiny vocabulary, tends to our continuous bound as T grows,
  with the error that Euler-Maclaurin predicts (exact here: the integrand is a quadratic);
* for the linear schedule, the hand-derived closed form ``sum over masked sets M of S(M) (|M|-1)! (L-|M|)! / L!``;
* a transcription of MDLM's released loss (``-log p * sigma' / expm1(sigma)`` after ``_subs_parameterization``);
* SUBS carry-over, by enumerating every masking pattern;
* the Monte Carlo bound and the training loss have the exact integrals as their means, within their standard errors;
* one end-to-end run of train.py, compute_elbo.py and predict.py on a tiny BERT.
"""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from diffusion import AbsorbingDiffusion, make_schedule, mdlm
from tests.conftest import assert_resume_is_exact, run_cli, run_here

pytestmark = pytest.mark.usefixtures("single_thread")

V, MASK, L = 4, 3, 3        # tokens 0..2, [MASK] = 3, sequences of 3 tokens
X0 = torch.tensor([[2, 0, 1]])
EPS = 1e-3                  # MDLM's log-linear eps


def table_model(seed: int = 0):
    """A fixed "network": logits [L, V] for each of the V^L states x_t, looked up; and the calls it received."""
    g = torch.Generator().manual_seed(seed)
    table = 1.5 * torch.randn(V ** L, L, V, generator=g, dtype=torch.float64)
    calls = []

    def denoise(x_t, t, attention_mask, positions):
        calls.append((x_t.clone(), positions.clone()))
        idx = (x_t * V ** torch.arange(L)).sum(-1)
        return table[idx][positions]
    return table, denoise, calls


def patterns():
    """Every masking pattern of the L positions: [2^L, L] bool."""
    return torch.tensor(list(itertools.product([False, True], repeat=L)))


def brute_S(table) -> dict:
    """S(M) = sum over l in M of -log p(x0_l | x_M), p the softmax over the tokens without [MASK], float64."""
    out = {}
    for m in patterns():
        x = X0[0].masked_fill(m, MASK)
        logp = table[int((x * V ** torch.arange(L)).sum())][:, :MASK].log_softmax(-1)
        out[tuple(m.tolist())] = float(-(logp[torch.arange(L), X0[0]] * m).sum())
    return out


def expect(S: dict, p: float) -> float:
    """E[S] when each position is masked independently with probability p."""
    return sum(v * p ** sum(m) * (1 - p) ** (L - sum(m)) for m, v in S.items())


def loglinear_alpha(k: int, T: int) -> float:
    """MDLM's alpha = 1 - (1 - eps) t at t = k/T, with alpha(1) = 0 (the sampler's all-[MASK] start)."""
    return 0.0 if k == T else 1.0 - (1.0 - EPS) * k / T


def discrete_nelbo(S: dict, T: int) -> float:
    """The T-step discrete NELBO: sum_k w_k E_{q(x_k)}[S], w_k = (alpha_{k-1} - alpha_k) / (1 - alpha_k) (§1.4)."""
    total = 0.0
    for k in range(1, T + 1):
        a_s, a_t = loglinear_alpha(k - 1, T), loglinear_alpha(k, T)
        total += (a_s - a_t) / (1 - a_t) * expect(S, 1 - a_t)
    return total


def gauss_legendre(f, n: int = 40) -> float:
    x, w = np.polynomial.legendre.leggauss(n)
    return float(sum(wi * f(0.5 * (xi + 1)) for xi, wi in zip(x, w)) * 0.5)


def ours_continuous(schedule_name: str, denoise) -> float:
    """Our continuous bound for the tiny model: int_0^1 w(s) E_q[S_ours] ds by quadrature, plus the jump term, with
    ``mdlm.weight``, the schedule and ``mdlm.loss_at``'s cross-entropies (every masking pattern enumerated)."""
    sch = make_schedule(schedule_name)
    proc = AbsorbingDiffusion(sch, 1000, MASK)
    ms = patterns()
    x_t = X0.expand(len(ms), L).masked_fill(ms, MASK)
    ce, _, _ = mdlm.masked_ce(proc, denoise, X0.expand(len(ms), L), x_t, torch.ones(len(ms), dtype=torch.long),
                              torch.ones_like(ms), torch.ones_like(ms))
    S = {tuple(m.tolist()): float(c) for m, c in zip(ms, ce.double())}

    def f(s):
        t = torch.tensor([s], dtype=torch.float64)
        return float(mdlm.weight(sch, t)) * expect(S, 1 - float(sch.alpha(t)))
    return gauss_legendre(f) + sch.end_jump * S[(True,) * L]


def test_discrete_bound_tends_to_the_continuous_one():
    """(a) L_T - L_inf = h [S_all - (f(b) + f(0))/2] + h^2/12 (f'(b) - f'(0)) exactly (Euler-Maclaurin; f(u) =
    E_u[S]/u is a quadratic for L = 3), with h = (1 - eps)/T, b = 1 - eps; so the error shrinks as 1/T."""
    table, denoise, _ = table_model()
    S = brute_S(table)
    ours = ours_continuous("loglinear", denoise)
    exact = gauss_legendre(lambda s: expect(S, (1 - EPS) * s) / s) + EPS * S[(True,) * L]  # w = 1/s
    assert ours == pytest.approx(exact, rel=1e-6)
    f = lambda u: sum(v * u ** (sum(m) - 1) * (1 - u) ** (L - sum(m)) for m, v in S.items())  # noqa: E731
    f0 = sum(v for m, v in S.items() if sum(m) == 1)
    df = lambda u, d=1e-5: (f(u + d) - f(u - d)) / (2 * d)  # noqa: E731 (f is a quadratic: exact to rounding)
    b, errs = 1 - EPS, {}
    for T in (10, 100, 1000):
        h = b / T
        predicted = h * (S[(True,) * L] - (f(b) + f0) / 2) + h * h / 12 * (df(b) - df(0.0))
        errs[T] = discrete_nelbo(S, T) - ours
        assert errs[T] == pytest.approx(predicted, rel=1e-4, abs=2e-7)  # 2e-7: float32 cross-entropies in ours
    print(f"continuous {ours:.6f}; discrete - continuous: " + ", ".join(f"T={T}: {e:.3e}" for T, e in errs.items()))
    # the sign is that of S_all - (f(b) + f(0))/2: for a random table either; for a model that predicts better with
    # fewer masks (S_all > L f(0)) the discrete bound is the looser one
    assert 9.0 < errs[100] / errs[1000] < 11.0 and 9.0 < errs[10] / errs[100] < 11.0
    assert abs(errs[1000]) < 2e-3 * ours


def test_linear_schedule_closed_form():
    """For alpha = 1 - t the bound is sum over masked sets M of S(M) (|M|-1)! (L-|M|)! / L! (the Beta integral of
    t^(|M|-1) (1-t)^(L-|M|)): the any-order autoregressive form, by hand."""
    table, denoise, _ = table_model(1)
    S = brute_S(table)
    closed = sum(v * math.factorial(sum(m) - 1) * math.factorial(L - sum(m)) / math.factorial(L)
                 for m, v in S.items() if sum(m))
    assert ours_continuous("mutual", denoise) == pytest.approx(closed, rel=1e-6)


def mdlm_released_loss(logits, x0, x_t, t, attention_mask, eps=EPS):
    """A transcription of MDLM's diffusion.py: ``_subs_parameterization`` then the continuous-time SUBS loss of
    ``_forward_pass_diffusion`` with LogLinearNoise, summed and divided by the attention mask's tokens (``_loss``)."""
    logits = logits.clone()
    logits[:, :, MASK] += -1000000.0
    logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = x_t != MASK
    logits[unmasked] = -1000000.0
    logits[unmasked, x_t[unmasked]] = 0
    sigma = -torch.log1p(-(1 - eps) * t)
    dsigma = (1 - eps) / (1 - (1 - eps) * t)
    log_p_theta = torch.gather(logits, -1, x0[:, :, None]).squeeze(-1)
    loss = -log_p_theta * (dsigma / torch.expm1(sigma))[:, None]
    return (loss * attention_mask).sum() / attention_mask.sum()


def test_loss_matches_mdlm_transcription():
    """(b) Fixed logits, x0, x_t and t: our per-token loss is MDLM's, and never looks at unmasked positions."""
    g = torch.Generator().manual_seed(3)
    B, Lb = 5, 7
    logits = torch.randn(B, Lb, V, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, MASK, (B, Lb), generator=g)
    x_t = x0.masked_fill(torch.rand(B, Lb, generator=g) < 0.5, MASK)
    t = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.999], dtype=torch.float64)
    ones = torch.ones(B, Lb, dtype=torch.bool)
    proc = AbsorbingDiffusion(make_schedule("loglinear"), 2048, MASK)
    nelbo, _, masked = mdlm.loss_at(proc, lambda x, tt, a, pos: logits[pos], x0, x_t, t, ones, ones)
    assert float(nelbo.sum() / ones.sum()) == pytest.approx(float(mdlm_released_loss(logits, x0, x_t, t, ones)),
                                                             rel=1e-5)
    assert torch.equal(masked, x_t == MASK)


def test_subs_carry_over_by_enumeration():
    """(c) For every masking pattern of x0 (all 2^L), our loss equals the SUBS transcription summed over all
    positions: unmasked positions carry their token over (log p = 0) and the network is asked only for the masked
    ones; and so the expectations over q at any t agree."""
    table, denoise, calls = table_model(2)
    proc = AbsorbingDiffusion(make_schedule("loglinear"), 100, MASK)
    ms = patterns()
    x0 = X0.expand(len(ms), L)
    x_t = x0.masked_fill(ms, MASK)
    t = torch.full((len(ms),), 0.4, dtype=torch.float64)
    ones = torch.ones_like(ms)
    ours, _, _ = mdlm.loss_at(proc, denoise, x0, x_t, t, ones, ones)
    full = table[(x_t * V ** torch.arange(L)).sum(-1)]  # [2^L, L, V]: every position's logits
    for i in range(len(ms)):
        want = mdlm_released_loss(full[i:i + 1], x0[i:i + 1], x_t[i:i + 1], t[i:i + 1], ones[i:i + 1]) * L
        assert float(ours[i]) == pytest.approx(float(want), rel=1e-5, abs=1e-9)
    assert float(ours[0]) == 0.0 and torch.equal(calls[-1][1], ms)  # nothing masked: no loss
    q = torch.tensor([0.6 ** int(m.sum()) * 0.4 ** (L - int(m.sum())) for m in ms], dtype=torch.float64)
    brute = sum(q[i] * v for i, v in enumerate(brute_S(table).values())) * float(mdlm.weight(proc.schedule, t[:1]))
    assert float((q * ours.double()).sum()) == pytest.approx(float(brute), rel=1e-5)


def test_conditioned_masking_law():
    """The bound's x_t given at least one masked position: the enumerated law q(M | M nonempty)."""
    g = torch.Generator().manual_seed(4)
    N, p = 40000, 0.15
    x0 = torch.tensor([[0, 1, 2]]).expand(N, L)
    ones = torch.ones(N, L, dtype=torch.bool)
    x_t = mdlm._some_masked(x0, torch.full((N,), p, dtype=torch.float64), ones, MASK, g)
    hit = 1 - (1 - p) ** L
    for m in patterns()[1:]:
        want = p ** int(m.sum()) * (1 - p) ** (L - int(m.sum())) / hit
        got = float((x_t == MASK).eq(m).all(-1).double().mean())
        assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / N), (m, got, want)
    assert bool(((x_t == MASK) | (x_t == x0)).all())  # SUBS: a position is masked or its clean token


@pytest.mark.parametrize("name", ["loglinear", "cosine"])
def test_monte_carlo_bound_mean(name):
    """(d) mdlm.nelbo's mean over many examples is the exact integral (quadrature) within 3 standard errors."""
    table, denoise, _ = table_model(5)
    exact = ours_continuous(name, denoise)
    proc = AbsorbingDiffusion(make_schedule(name), 1000, MASK)
    N = 6000
    x0, ones = X0.expand(N, L), torch.ones(N, L, dtype=torch.bool)
    est = mdlm.nelbo(proc, denoise, x0, ones, ones, draws=2, generator=torch.Generator().manual_seed(6))
    se = float(est.std() / math.sqrt(N))
    assert se < 0.02 * exact  # the estimator's variance is finite and small
    assert abs(float(est.mean()) - exact) < 3 * se, (float(est.mean()), exact, se)


def test_training_loss_mean_is_the_truncated_integral():
    """The training loss (t in [1e-3, 1), low-discrepancy) has mean int_eps^1 w E[S] ds, within 3 s.e."""
    table, denoise, _ = table_model(7)
    S = brute_S(table)
    proc = AbsorbingDiffusion(make_schedule("loglinear"), 1000, MASK)
    N = 20000
    out = mdlm.loss(proc, denoise, X0.expand(N, L), torch.ones(N, L, dtype=torch.bool),
                    torch.ones(N, L, dtype=torch.bool), low_discrepancy=True, generator=torch.Generator().manual_seed(8))
    a = mdlm.SAMPLING_EPS
    exact = (1 - a) * gauss_legendre(lambda v: expect(S, (1 - EPS) * (a + (1 - a) * v)) / (a + (1 - a) * v))
    se = float(out.nelbo.double().std() / math.sqrt(N))
    assert abs(float(out.nelbo.double().mean()) - exact) < 3 * se, (float(out.nelbo.mean()), exact, se)


def test_low_discrepancy_times():
    """One time in each of the n strata of [eps, 1) (MDLM's antithetic _sample_t)."""
    t = mdlm.sample_t(64, "cpu", low_discrepancy=True, eps=1e-3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(((t - 1e-3) / (1 - 1e-3) * 64).floor().long(), torch.arange(64))


@pytest.mark.parametrize("name", ["mutual", "cosine", "loglinear"])
def test_dalpha_is_the_derivative_of_alpha(name):
    sch = make_schedule(name)
    s, d = torch.linspace(0.01, 0.99, 50, dtype=torch.float64), 1e-6
    numeric = (sch.alpha(s + d) - sch.alpha(s - d)).squeeze(-1) / (2 * d)
    torch.testing.assert_close(sch.dalpha(s), numeric, rtol=1e-6, atol=1e-8)
    assert sch.end_jump == pytest.approx(float(sch.alpha(torch.tensor([1 - 1e-12], dtype=torch.float64))), abs=1e-9)


def test_spindle_refused():
    sch = make_schedule("spindle", counts=torch.ones(V))
    with pytest.raises(ValueError, match="token-dependent"):
        mdlm.check_schedule(sch)


@pytest.mark.slow
def test_end_to_end(tmp_path, tiny_bert, tiny_corpus):
    """train.py --objective mdlm (low-discrepancy, a layer-wise time embedding), then its continuous-time bound and
    samples from its checkpoint."""
    out = tmp_path / "run"
    run_cli("train.py", "--objective", "mdlm", "--low_discrepancy", "--time_conditioning", "layerwise",
            "--model_name_or_path", tiny_bert, "--dataset", "text", "--data_files", tiny_corpus, "--num_steps", "64",
            "--max_len", "32", "--batch_size", "8", "--eval_examples", "8", "--eval_steps", "4", "--lr", "1e-3",
            "--warmup_steps", "0", "--max_steps", "2", "--eval_every", "2", "--out_dir", str(out), "--log_dir",
            str(tmp_path / "logs"), cwd=str(tmp_path))
    stored = json.loads((out / "checkpoints" / "last" / "run_config.json").read_text())
    assert stored["config"]["objective"] == "mdlm" and stored["config"]["schedule"] == "loglinear"
    from runtime.assemble import load_for_inference
    sch = load_for_inference(str(out), torch.device("cpu")).diffusion.schedule  # what predict.py samples with
    assert sch.name == "loglinear" and sch.eps == EPS
    res = tmp_path / "elbo.json"
    proc = run_here("compute_elbo.py", "--checkpoint", str(out), "--num_examples", "6", "--eval_steps", "3",
                    "--batch_size", "4", "--out", str(res), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(res.read_text())
    assert r["time"] == "continuous" and r["t_draws"] == 3 and r["end_jump"] == EPS
    assert r["nelbo_per_token"] > 0 and r["nelbo_per_token_se"] > 0 and r["tokens"] > 0 and r["words"] > 0
    proc = run_here("predict.py", "--checkpoint", str(out), "--num_samples", "2", "--steps", "8", "--sampler",
                    "first_hitting", "--out_dir", str(tmp_path / "gen"), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_resume_is_exact(tmp_path, tiny_bert, tiny_corpus):
    """An MDLM run resumed halfway gives the same losses and weights as one uninterrupted run (its t and masks come
    from the RNG state the checkpoint keeps)."""
    def args_of(out, max_steps, extra):
        return ("train.py", "--objective", "mdlm", "--low_discrepancy", "--model_name_or_path", tiny_bert, "--dataset",
                "text", "--data_files", tiny_corpus, "--num_steps", "64", "--max_len", "32", "--batch_size", "4",
                "--eval_examples", "4", "--lr", "1e-3", "--warmup_steps", "0", "--decay", "constant",
                "--max_steps", str(max_steps), "--eval_every", "2", "--save_every", "2", "--log_every", "1", "--out_dir", str(out), "--log_dir",
                str(out) + "-logs", *extra)
    assert_resume_is_exact(tmp_path, args_of, steps=4)
