"""The Gaussian (DiffuSeq) process, respacing, adaptive decay timesteps, the lossaware sampler and
Tang et al.'s post-training loss: exact properties on tiny tensors and a tiny transformer."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion import (GaussianDiffusion, LossAwareSampler, adaptive_decay_timesteps, gaussian_betas,
                       parse_respacing, uniform_timesteps)
from models import DiffuSeqTransformer

ADP_REFERENCE = {  # ALGORITHMS.md §3, T = 2000
    4: [0, 667, 1334, 1999],
    10: [0, 667, 833, 1000, 1167, 1334, 1500, 1666, 1833, 1999],
    20: [0, 333, 667, 762, 857, 952, 1048, 1143, 1238, 1334, 1400, 1467, 1534, 1600, 1666, 1733, 1800, 1866,
         1932, 1999],
}


# ---------------------------------------------------------------- schedules and respacing

def test_sqrt_schedule_check_values():
    g = GaussianDiffusion(gaussian_betas("sqrt", 2000))
    assert float(g.alphabar[0]) == pytest.approx(0.98536, abs=5e-6)
    assert float(g.sqrt_1m_ab[0]) == pytest.approx(0.121, abs=5e-4)
    # the closed form 1 - sqrt(t/T + 1e-4), normalised by its value at 0, at a few steps
    for t in (0, 10, 999, 1998):
        expected = (1 - math.sqrt((t + 1) / 2000 + 1e-4)) / (1 - math.sqrt(1e-4))
        assert float(g.alphabar[t]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", ["sqrt", "linear", "cosine"])
def test_schedules_are_valid(name):
    b = gaussian_betas(name, 500)
    assert b.shape == (500,) and (b > 0).all() and (b <= 0.999).all()
    ab = torch.cumprod(1 - b, 0)
    assert (ab[1:] < ab[:-1]).all() and float(ab[-1]) < 0.05


def test_unknown_schedule_and_tiny_T():
    with pytest.raises(ValueError, match="unknown"):
        gaussian_betas("quadratic", 100)
    with pytest.raises(ValueError):
        gaussian_betas("sqrt", 1)


@pytest.mark.parametrize("steps", [ADP_REFERENCE[20], uniform_timesteps(2000, 7), [0, 1, 2, 1500, 1999]])
def test_respaced_betas_reproduce_alphabar(steps):
    g = GaussianDiffusion(gaussian_betas("sqrt", 2000))
    chain = g.respace(steps)
    assert torch.allclose(torch.cumprod(1 - chain.betas, 0), g.alphabar[steps], rtol=1e-9, atol=0)
    # the last step (index 0) returns the clamped prediction itself
    assert float(chain.coef_x0[0]) == 1.0 and float(chain.coef_zt[0]) == 0.0


def test_full_respacing_is_the_one_step_chain():
    g = GaussianDiffusion(gaussian_betas("sqrt", 200))
    chain = g.respace(range(200))
    assert torch.allclose(chain.betas, g.betas, rtol=1e-10, atol=1e-15)
    # posterior mean coefficients of Ho et al. (2020), Eq. 7, with the one-step quantities
    ab, ab_prev = g.alphabar[1:], g.alphabar[:-1]
    assert torch.allclose(chain.coef_x0[1:], g.betas[1:] * ab_prev.sqrt() / (1 - ab))
    assert torch.allclose(chain.coef_zt[1:], (1 - ab_prev) * (1 - g.betas[1:]).sqrt() / (1 - ab))


@pytest.mark.parametrize("n", sorted(ADP_REFERENCE))
def test_adaptive_decay_matches_the_reference_sets(n):
    assert adaptive_decay_timesteps(2000, n) == ADP_REFERENCE[n]
    assert parse_respacing(f"adp_{n}", 2000) == ADP_REFERENCE[n]


def test_adaptive_decay_puts_most_steps_at_high_noise():
    for n in (8, 20, 50, 100):
        s = adaptive_decay_timesteps(2000, n)
        assert len(s) == n == len(set(s)) and s[0] == 0 and s[-1] == 1999
        low = sum(1 for x in s if x < 2000 / 3)
        high = sum(1 for x in s if x >= 4000 / 3)
        assert low < high


def test_respacing_specs_and_errors():
    assert parse_respacing("full", 50) == list(range(50)) == parse_respacing(None, 50)
    assert parse_respacing("uniform_2", 50) == [0, 49]
    assert parse_respacing("0, 10,49", 50) == [0, 10, 49]
    for bad, msg in (("adp_3000", "exceed"), ("uniform_3000", "exceed"), ("uniform_1", "at least 2"),
                     ("adp_1", "at least 2"), ("adp_x", "integer"), ("5,10", "include 0"), ("0,0,3", "repeated"),
                     ("0,50", r"\[0, 50\)"), ("bogus", "use full")):
        with pytest.raises(ValueError, match=msg):
            parse_respacing(bad, 50)


# ---------------------------------------------------------------- lossaware sampler

def test_lossaware_history_matches_a_naive_loop():
    T, H = 6, 3
    s = LossAwareSampler(T, history=H)
    naive = {t: [] for t in range(T)}
    gen = torch.Generator().manual_seed(0)
    for _ in range(7):
        t = torch.randint(0, T, (9,), generator=gen)
        losses = torch.rand(9, generator=gen, dtype=torch.float64)
        s.update(t, losses)
        for ti, li in zip(t.tolist(), losses.tolist()):
            naive[ti] = (naive[ti] + [li])[-H:]
    for t in range(T):
        assert sorted(s.losses[t, : min(H, int(s.count[t]))].tolist()) == pytest.approx(sorted(naive[t]))
    assert s.warmed_up()
    p = s.probs()
    expected = torch.tensor([math.sqrt(sum(x * x for x in naive[t]) / H) for t in range(T)], dtype=torch.float64)
    expected = expected / expected.sum() * (1 - 0.001) + 0.001 / T
    assert torch.allclose(p, expected)
    t, w = s.sample(1000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(w.double(), 1.0 / (T * p[t]), rtol=1e-6)


def test_lossaware_is_uniform_until_warm_and_resumes_exactly():
    s = LossAwareSampler(4, history=2)
    s.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0]))
    assert not s.warmed_up() and torch.allclose(s.probs(), torch.full((4,), 0.25, dtype=torch.float64))
    s.update(torch.tensor([0, 1, 2, 3, 3]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    r = LossAwareSampler(4, history=2)
    r.load_state_dict(s.state_dict())
    assert torch.equal(r.probs(), s.probs()) and r.warmed_up()


# ---------------------------------------------------------------- loss, post-training, sampling

def tiny_model(seed=0, vocab=40, D=8):
    torch.manual_seed(seed)
    m = DiffuSeqTransformer(vocab, emb_dim=D, hidden_size=16, num_layers=1, num_heads=2, max_len=12,
                            num_steps=100, dropout=0.0)
    return m.eval()


def tiny_batch(B=3, L=10, src=4, vocab=40):
    ids = torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(3))
    noise_mask = torch.arange(L)[None].expand(B, L) >= torch.tensor([src, src + 1, src + 2])[:B, None]
    return ids, noise_mask


def masked_mean(x, m):
    x = x.mean(-1) if x.dim() == 3 else x
    return (x * m).sum(1) / m.sum(1)


def direct_terms(m, g, ids, noise_mask, z0):
    """Rounding NLL and L_T computed directly, over the whole [B, L, V] logits."""
    logp = torch.log_softmax(m.logits(z0), -1).gather(-1, ids[..., None])[..., 0]
    nll = masked_mean(-logp, noise_mask.double())
    t_T = masked_mean((g.alphabar[-1].sqrt() * z0).pow(2), noise_mask.double())
    return nll, t_T


def test_loss_matches_a_direct_computation():
    m, g = tiny_model(), GaussianDiffusion(gaussian_betas("sqrt", 100))
    ids, noise_mask = tiny_batch()
    t = torch.tensor([0, 37, 99])
    w = torch.tensor([0.5, 1.0, 2.0])
    out = g.loss(m, ids, noise_mask, t, w, generator=torch.Generator().manual_seed(7))

    gen = torch.Generator().manual_seed(7)
    emb = m.embed(ids)
    z0 = emb + math.sqrt(float(g.betas[0])) * torch.randn(emb.shape, generator=gen)
    eps = torch.randn(emb.shape, generator=gen)
    ab = g.alphabar[t].float()[:, None, None]
    z_t = torch.where(noise_mask[..., None], ab.sqrt() * z0 + (1 - ab).sqrt() * eps, z0)
    x0_hat = m(z_t, t)
    target = z0.clone()
    target[0] = emb[0]  # t = 0: the target is Emb(w) itself
    mse = masked_mean((x0_hat - target).pow(2), noise_mask.float())
    nll, t_T = direct_terms(m, g, ids, noise_mask, z0)
    per = mse + nll.float() + t_T.float()
    assert torch.allclose(out.per_example, per, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.loss, (w * per).mean(), rtol=1e-5)


def test_neighbourhoods_are_exact():
    g = GaussianDiffusion(gaussian_betas("sqrt", 2000))
    lo, hi = g.neighbourhoods(0.05)
    a = g.sqrt_1m_ab
    for t in (0, 1, 500, 1000, 1999):
        inside = ((a - a[t]).abs() <= 0.05).nonzero().flatten()
        assert int(lo[t]) == int(inside.min()) and int(hi[t]) == int(inside.max())
    t = torch.randint(0, 2000, (4000,), generator=torch.Generator().manual_seed(0))
    t2, valid = g.neighbour_steps(t, 0.05, generator=torch.Generator().manual_seed(1))
    assert ((a[t2] - a[t]).abs() <= 0.05 + 1e-12).all()
    assert (t2[valid] != t[valid]).all() and (t2[~valid] == t[~valid]).all()
    assert 0.3 < float((t2 < t).double().mean()) < 0.7  # both sides are drawn
    # t = 0 has no left side: its draws are either right-side steps or dropped
    t0, v0 = g.neighbour_steps(torch.zeros(200, dtype=torch.long), 0.05, generator=torch.Generator().manual_seed(2))
    assert (t0[v0] > 0).all() and (~v0).any()


@pytest.mark.parametrize("variant", ["l2_noise_random", "self_renoise"])
def test_post_train_loss_matches_a_direct_computation(variant):
    m, g = tiny_model(1), GaussianDiffusion(gaussian_betas("sqrt", 100))
    ids, noise_mask = tiny_batch()
    t = torch.tensor([3, 50, 98])
    lam, noise = -2.0, 0.1
    out = g.post_train_loss(m, ids, noise_mask, t, simi_lambda=lam, simi_noise=noise, variant=variant,
                            generator=torch.Generator().manual_seed(11))

    gen = torch.Generator().manual_seed(11)
    emb = m.embed(ids)
    z0 = emb + math.sqrt(float(g.betas[0])) * torch.randn(emb.shape, generator=gen)
    t2, valid = g.neighbour_steps(t, noise, generator=gen)

    def noised(x0, tt):
        ab = g.alphabar[tt].float()[:, None, None]
        z = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=gen)
        return torch.where(noise_mask[..., None], z, z0)

    z_t = noised(z0, t)
    f1 = m(z_t, t)
    f2 = m(noised(z0, t2), t2) if variant == "l2_noise_random" else m(noised(f1.detach(), t2), t2)
    fm = noise_mask.float()
    mse1 = masked_mean((f1 - z0).pow(2), fm)  # no t = 0 here, so the target is z0
    target2 = torch.where((t2 == 0)[:, None, None], emb, z0)
    mse2 = masked_mean((f2 - target2).pow(2), fm)
    nll, t_T = direct_terms(m, g, ids, noise_mask, z0)
    penalty = masked_mean((f1 - f2).pow(2), fm) * valid.float()
    per = 0.5 * (mse1 + mse2 + 2 * nll.float() + 2 * t_T.float()) - lam * penalty
    assert torch.allclose(out.per_example, per, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.penalty, penalty, rtol=1e-5, atol=1e-7)
    assert valid.any() and (out.penalty[valid] > 0).all()


def test_nearest_embedding_is_the_l2_argmin():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(300, 8, generator=gen) * torch.rand(300, 1, generator=gen) * 3  # rows of varied norm
    z = torch.randn(1000, 8, generator=gen) * 2
    got = GaussianDiffusion.nearest_embedding(z, table, chunk=128)
    assert torch.equal(got, torch.cdist(z, table).argmin(-1))
    # the nearest is not the largest dot product when norms differ (DiffuSeq's final-step mismatch)
    assert (got != (z @ table.t()).argmax(-1)).any()


def test_sampling_keeps_the_source_and_clamps_the_target():
    m, g = tiny_model(2), GaussianDiffusion(gaussian_betas("sqrt", 100))
    ids, noise_mask = tiny_batch()
    out = g.sample(m, ids, noise_mask, adaptive_decay_timesteps(100, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.x0[~noise_mask], ids[~noise_mask])
    assert torch.equal(out.z0[~noise_mask], m.embed(ids)[~noise_mask])  # source reset to Emb(w)
    # the final target vectors are exactly embedding rows, and the tokens are those rows
    assert torch.equal(out.z0[noise_mask], m.embedding_weight[out.x0[noise_mask]])
    assert out.network_calls == 10 and out.row_evaluations == 30
    again = g.sample(m, ids, noise_mask, adaptive_decay_timesteps(100, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.x0, out.x0)


def test_step_with_clamping_moves_toward_the_clamped_prediction():
    m, g = tiny_model(3), GaussianDiffusion(gaussian_betas("sqrt", 100))
    ids, noise_mask = tiny_batch()
    chain = g.respace(range(100))
    z_src = m.embed(ids)
    z = torch.where(noise_mask[..., None], torch.randn(z_src.shape, generator=torch.Generator().manual_seed(0)), z_src)
    with torch.no_grad():
        z_prev, tokens = g.step(m, z, 40, chain, noise_mask, z_src, generator=torch.Generator().manual_seed(1))
        x0_hat = m(z, torch.full((3,), 40))
    assert torch.equal(tokens, torch.cdist(x0_hat[noise_mask], m.embedding_weight).argmin(-1))
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    clamped = x0_hat.clone()
    clamped[noise_mask] = m.embedding_weight[tokens]
    expected = (float(chain.coef_x0[40]) * clamped + float(chain.coef_zt[40]) * z
                + math.sqrt(float(chain.betas[40])) * eps)
    assert torch.allclose(z_prev[noise_mask], expected[noise_mask], atol=1e-6)
    assert torch.equal(z_prev[~noise_mask], z_src[~noise_mask])
