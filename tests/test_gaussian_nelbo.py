"""GaussianDiffusion.nelbo (docs/algorithms.md §2.9) against oracles that do not use it: the ELBO from its
definition by Monte Carlo over whole chains (torch.distributions log-densities), and, with every term
computed (K = T - 1), the textbook Gaussian KLs summed in a plain loop over the same draws."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from diffusion import GaussianDiffusion, gaussian_betas
from models import DiffuSeqTransformer

BETAS = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)  # T = 4; alphabar_{T-1} = 0.0252, not 0
V, D = 3, 2
IDS = torch.tensor([[2, 0, 1]])
MASK = torch.tensor([[False, True, True]])  # position 0 fixed (like [CLS]), two noised positions


class ToyDenoiser:
    """Deterministic and position-mixing (so the fixed position is really conditioned on), float64."""

    def __init__(self, T: int):
        g = torch.Generator().manual_seed(0)
        self.embedding_weight = torch.randn(V, D, generator=g, dtype=torch.float64)
        self.bias = torch.randn(V, generator=g, dtype=torch.float64)
        self.W = 0.7 * torch.randn(D, D, generator=g, dtype=torch.float64)
        self.U = 0.7 * torch.randn(D, D, generator=g, dtype=torch.float64)
        self.c = 0.5 * torch.randn(T, D, generator=g, dtype=torch.float64)

    def embed(self, ids):
        return self.embedding_weight[ids]

    def logits(self, z):
        return z @ self.embedding_weight.T + self.bias

    def __call__(self, z, t):
        return 1.5 * torch.tanh(z @ self.W + z.mean(1, keepdim=True) @ self.U + self.c[t][:, None, :])


def oracle_elbo_samples(den, n: int, seed: int) -> torch.Tensor:
    """[n] draws of log q(x, z_{0:T-1} | w) - log p(w, x, z_{0:T-1}) over whole forward chains, from the
    definitions: q(x|w) = N(e, b0), q(z_0|x) = N(sqrt(1-b0) x, b0), q(z_t|z_{t-1}) = N(sqrt(1-b_t) z_{t-1}, b_t);
    p(z_{T-1}) = N(0, 1), p(z_{t-1}|z_t) = N(posterior mean with x0 := f(z_t, t), b_t), p(x|z_0) = N(f(z_0, 0), b0),
    p(w|x) = softmax(logits(x))[w]. Only the noised positions are random; the fixed one is Emb(w) throughout."""
    g = torch.Generator().manual_seed(seed)
    b, T = BETAS, len(BETAS)
    ab = torch.cumprod(1 - b, 0)
    ids, mask = IDS.expand(n, -1), MASK.expand(n, -1)
    e = den.embed(ids)
    held = lambda z: torch.where(mask[..., None], z, e)  # noqa: E731

    def draw(mean, var):
        return mean + math.sqrt(var) * torch.randn(mean.shape, generator=g, dtype=torch.float64)

    x = draw(e, b[0])
    z = [draw(math.sqrt(1 - b[0]) * x, b[0])]
    log_q = Normal(e, math.sqrt(b[0])).log_prob(x) + Normal(math.sqrt(1 - b[0]) * x, math.sqrt(b[0])).log_prob(z[0])
    for t in range(1, T):
        z.append(draw(math.sqrt(1 - b[t]) * z[t - 1], b[t]))
        log_q = log_q + Normal(math.sqrt(1 - b[t]) * z[t - 1], math.sqrt(b[t])).log_prob(z[t])
    log_p = Normal(0.0, 1.0).log_prob(z[T - 1])
    for t in range(T - 1, 0, -1):
        f = den(held(z[t]), torch.full((n,), t))
        mean = (math.sqrt(ab[t - 1]) * b[t] / (1 - ab[t])) * f + (math.sqrt(1 - b[t]) * (1 - ab[t - 1]) / (1 - ab[t])) * z[t]
        log_p = log_p + Normal(mean, math.sqrt(b[t])).log_prob(z[t - 1])
    log_p = log_p + Normal(den(held(z[0]), torch.zeros(n, dtype=torch.long)), math.sqrt(b[0])).log_prob(x)
    log_ratio = (log_q - log_p).sum(-1)  # [n, L]
    log_pw = torch.log_softmax(den.logits(x), -1).gather(-1, ids[..., None])[..., 0]
    return ((log_ratio - log_pw) * mask).sum(1)


def mean_and_se(v: torch.Tensor):
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


@pytest.mark.parametrize("K", [3, 2, 1])  # every term; strata of sizes 1 and 2; one stratum of size 3
def test_nelbo_matches_the_elbo_from_its_definition(K):
    """Both sides are unbiased estimates of the same number (about 91.5 nats), from independent draws with
    fixed seeds. The tolerance is 5 combined standard errors (a false alarm once in ~2 million seeds). The
    test has power: the combined standard error must be below 0.06 nats (it is 0.04-0.05), so 5 of them are
    under 0.3 nats, while the smallest plausible slip, dropping the -D/2 log(2 - beta_0) of the two noised
    positions, moves the answer by 2 * log(1.9) = 1.28 nats."""
    den = ToyDenoiser(len(BETAS))
    g = GaussianDiffusion(BETAS)
    n = 400_000
    oracle, oracle_se = mean_and_se(oracle_elbo_samples(den, n, seed=1))
    ours, ours_se = mean_and_se(g.nelbo(den, IDS.expand(n, -1), MASK.expand(n, -1), K,
                                        generator=torch.Generator().manual_seed(2)))
    se = math.hypot(oracle_se, ours_se)
    assert se < 0.06
    assert abs(ours - oracle) < 5 * se, (ours, oracle, se)


def gauss_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) per dimension, the textbook formula, summed over the last dim."""
    return (0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)).sum(-1)


def test_all_terms_are_the_closed_form_kls_of_the_same_draws():
    """K = T - 1: no sampling of t. Replays nelbo's documented draws and sums the textbook KLs in a loop."""
    den = ToyDenoiser(len(BETAS))
    gd = GaussianDiffusion(BETAS)
    B, T = 5, len(BETAS)
    ids = torch.randint(0, V, (B, 3), generator=torch.Generator().manual_seed(5))
    mask = MASK.expand(B, -1)
    got = gd.nelbo(den, ids, mask, T - 1, generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    b = BETAS
    ab = torch.cumprod(1 - b, 0)
    ab_at = lambda t: 1.0 if t < 0 else float(ab[t])  # noqa: E731
    e = den.embed(ids)
    held = lambda z: torch.where(mask[..., None], z, e)  # noqa: E731
    x = e + math.sqrt(b[0]) * torch.randn(e.shape, generator=g, dtype=torch.float64)
    z0 = math.sqrt(ab[0]) * x + math.sqrt(1 - ab[0]) * torch.randn(e.shape, generator=g, dtype=torch.float64)
    torch.rand((T - 1, B), generator=g, dtype=torch.float64)  # the strata's uniforms (unused: strata of size 1)
    per_pos = -torch.log_softmax(den.logits(x), -1).gather(-1, ids[..., None])[..., 0]  # rounding
    full = lambda v: torch.full_like(x, float(v))  # noqa: E731
    per_pos += gauss_kl(math.sqrt(ab[T - 1]) * x, full(1 - ab[T - 1]), torch.zeros_like(x), torch.ones_like(x))
    # t = 0: q(x | z_0, w) by Bayes' rule (precisions add), and -I(x; z_0 | w) from the two entropies of z_0
    prec = 1 / b[0] + (1 - b[0]) / b[0]
    q_mean = (e / b[0] + math.sqrt(1 - b[0]) * z0 / b[0]) / prec
    per_pos += gauss_kl(q_mean, full(1 / prec), den(held(z0), torch.zeros(B, dtype=torch.long)), full(b[0]))
    per_pos -= D * (Normal(0.0, math.sqrt(b[0] * (2 - b[0]))).entropy() - Normal(0.0, math.sqrt(b[0])).entropy())
    for t in range(1, T):
        z_t = math.sqrt(ab[t]) * x + math.sqrt(1 - ab[t]) * torch.randn(e.shape, generator=g, dtype=torch.float64)
        c_x0 = math.sqrt(ab_at(t - 1)) * b[t] / (1 - ab[t])
        c_zt = math.sqrt(1 - b[t]) * (1 - ab_at(t - 1)) / (1 - ab[t])
        f = den(held(z_t), torch.full((B,), t))
        post_var = b[t] * (1 - ab_at(t - 1)) / (1 - ab[t])
        per_pos += gauss_kl(c_x0 * x + c_zt * z_t, full(post_var), c_x0 * f + c_zt * z_t, full(b[t]))
    want = (per_pos * mask).sum(1)
    # float32 cross-entropy inside nelbo (chunked_cross_entropy), float64 elsewhere
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (got, want)
    # capped at T - 1: asking for more is the same computation
    assert torch.equal(gd.nelbo(den, ids, mask, 10 * T, generator=torch.Generator().manual_seed(7)), got)


def test_fixed_positions_are_conditioned_on_not_scored():
    """Changing a fixed token changes the bound only through the network's input: with a network that ignores
    its input, the bound does not move; with the position-mixing one, it does."""
    den = ToyDenoiser(len(BETAS))
    gd = GaussianDiffusion(BETAS)
    ids2 = IDS.clone()
    ids2[0, 0] = (IDS[0, 0] + 1) % V
    run = lambda d, ids: gd.nelbo(d, ids, MASK, 3, generator=torch.Generator().manual_seed(3))  # noqa: E731

    class Blind(ToyDenoiser):
        def __call__(self, z, t):
            return torch.zeros_like(z) + self.c[t][:, None, :]

    blind = Blind(len(BETAS))
    assert torch.equal(run(blind, IDS), run(blind, ids2))
    assert not torch.allclose(run(den, IDS), run(den, ids2))


def test_nelbo_of_a_tiny_transformer_is_finite_and_reproducible():
    torch.manual_seed(0)
    net = DiffuSeqTransformer(40, emb_dim=8, hidden_size=16, num_layers=1, num_heads=2, max_len=12,
                              num_steps=50, dropout=0.0).eval()
    gd = GaussianDiffusion(gaussian_betas("sqrt", 50))
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    a = gd.nelbo(net, ids, mask, 8, generator=torch.Generator().manual_seed(4))
    b = gd.nelbo(net, ids, mask, 8, generator=torch.Generator().manual_seed(4))
    assert a.shape == (3,) and a.dtype == torch.float64 and torch.isfinite(a).all() and torch.equal(a, b)
    # an untrained network's bound is above the uniform code length log V per noised token
    assert (a > mask.sum(1) * math.log(40)).all()
    with pytest.raises(ValueError):
        gd.nelbo(net, ids, mask, 0)
