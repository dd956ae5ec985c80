"""The Gaussian (DiffuSeq) process, respacing, adaptive decay timesteps, the lossaware sampler and
Tang et al.'s post-training loss: exact properties on tiny tensors and a tiny transformer."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion import (GaussianDiffusion, LossAwareSampler, adaptive_decay_timesteps, gaussian_betas,
                       parse_respacing, uniform_timesteps)
from diffusion.gaussian import EmbeddingIndex, _first_argmin
from models import DiffuSeqTransformer
from released_diffuseq import (SpacedDiffusion, denoised_fn_round, diffuseq_losses, fill_noise_map, get_efficient_knn,
                               space_timesteps_adp, sqrt_betas, t_similar_by_noise, tang_losses)

ADP_REFERENCE = {  # docs/algorithms.md §3.3, T = 2000
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
    grid = g.timesteps(steps)  # descending, then -1; flipped below to the ascending kept steps
    betas, coef_x0, coef_zt = (c.flip(0) for c in g.posterior_coefficients(grid[:-1], grid[1:]))
    assert torch.allclose(torch.cumprod(1 - betas, 0), g.alphabar[steps], rtol=1e-9, atol=0)
    # the last step (to the data, s = -1) returns the clamped prediction itself
    assert float(coef_x0[0]) == 1.0 and float(coef_zt[0]) == 0.0


def test_full_respacing_is_the_one_step_chain():
    g = GaussianDiffusion(gaussian_betas("sqrt", 200))
    grid = g.timesteps(range(200))
    betas, coef_x0, coef_zt = (c.flip(0) for c in g.posterior_coefficients(grid[:-1], grid[1:]))
    assert torch.allclose(betas, g.betas, rtol=1e-10, atol=1e-15)
    # posterior mean coefficients of Ho et al. (2020), Eq. 7, with the one-step quantities
    ab, ab_prev = g.alphabar[1:], g.alphabar[:-1]
    assert torch.allclose(coef_x0[1:], g.betas[1:] * ab_prev.sqrt() / (1 - ab))
    assert torch.allclose(coef_zt[1:], (1 - ab_prev) * (1 - g.betas[1:]).sqrt() / (1 - ab))


@pytest.mark.parametrize("n", sorted(ADP_REFERENCE))
def test_adaptive_decay_matches_the_reference_sets(n):
    assert adaptive_decay_timesteps(2000, n) == ADP_REFERENCE[n]
    assert parse_respacing(f"adp_{n}", 2000) == ADP_REFERENCE[n]


@pytest.mark.parametrize("T", [100, 1000, 2000, 4000])
def test_adaptive_decay_is_the_released_algorithm_for_every_n(T):
    """adp_N against the transcription of Tang et al.'s space_timesteps for N = 4..200: the same set
    wherever the release accepts (T, N), an error wherever it raises."""
    accepted = 0
    for n in range(4, 201):
        try:
            expected = sorted(space_timesteps_adp(T, n))
        except ValueError:
            with pytest.raises(ValueError):
                adaptive_decay_timesteps(T, n)
            continue
        accepted += 1
        assert adaptive_decay_timesteps(T, n) == expected, (T, n)
    # by hand: at T = 100 the top section (33 steps) holds c2 = N - round(p0 N) - round(p1 N) steps up to
    # N = 60 (c2 = 33) and not at N = 61 (c2 = 34); for T >= 1000 every N <= 200 fits
    assert accepted == (57 if T == 100 else 197)


def test_adaptive_decay_section_sizes_are_integers():
    # T = 1000: sections of 334/333/333 steps, so the middle section starts at 334 (not at T/3 = 333.3)
    assert adaptive_decay_timesteps(1000, 4) == [0, 334, 667, 999]
    assert adaptive_decay_timesteps(100, 10) == [0, 34, 42, 50, 58, 67, 75, 83, 91, 99]
    for n in (2, 3):  # the released sets stop short of T - 1 here
        assert max(space_timesteps_adp(2000, n)) < 1999
        with pytest.raises(ValueError, match="at least 4"):
            adaptive_decay_timesteps(2000, n)


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
                     ("adp_1", "at least 2"), ("adp_x", "integer"), ("adp_40", "too small"), ("5,10", "include 0"),
                     ("0,0,3", "repeated"),
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


def test_loss_all_positions_is_diffuseqs_released_loss():
    """--loss_average all against a transcription of DiffuSeq's training_losses_seq2seq (mean_flat,
    unmasked decoder NLL), with the same noise."""
    m, g = tiny_model(), GaussianDiffusion(gaussian_betas("sqrt", 100))
    ids, noise_mask = tiny_batch()
    t = torch.tensor([0, 37, 99])
    w = torch.tensor([0.5, 1.0, 2.0])
    out = g.loss(m, ids, noise_mask, t, w, generator=torch.Generator().manual_seed(7), average="all")

    gen = torch.Generator().manual_seed(7)  # our draw order: the noise of z0, then that of z_t
    emb = m.embed(ids)
    x_start = emb + math.sqrt(1 - float(g.alphabar[0])) * torch.randn(emb.shape, generator=gen)
    terms = diffuseq_losses(m, m.logits, g.alphabar, ids, noise_mask.long(), t, emb, x_start,
                            torch.randn(emb.shape, generator=gen))
    assert torch.allclose(out.per_example, terms["loss"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.loss, (w * terms["loss"]).mean(), rtol=1e-5)
    assert torch.allclose(out.nll, terms["decoder_nll"], rtol=1e-5)
    # the source tokens' embeddings get a gradient from the rounding NLL (they are what clamping searches)
    src_only = ids[0, :4][~torch.isin(ids[0, :4], ids[noise_mask])]
    assert len(src_only) > 0
    m.zero_grad()
    g.loss(m, ids, noise_mask, t, generator=torch.Generator().manual_seed(7), average="all").loss.backward()
    assert (m.word_embedding.weight.grad[src_only].abs().sum(-1) > 0).all()


def test_loss_target_positions_matches_a_direct_computation():
    """--loss_average target: MSE, rounding NLL and L_T averaged over the target positions only."""
    m, g = tiny_model(), GaussianDiffusion(gaussian_betas("sqrt", 100))
    ids, noise_mask = tiny_batch()
    t = torch.tensor([0, 37, 99])
    out = g.loss(m, ids, noise_mask, t, generator=torch.Generator().manual_seed(7), average="target")

    gen = torch.Generator().manual_seed(7)
    emb = m.embed(ids)
    z0 = emb + math.sqrt(float(g.betas[0])) * torch.randn(emb.shape, generator=gen)
    eps = torch.randn(emb.shape, generator=gen)
    ab = g.alphabar[t].float()[:, None, None]
    z_t = torch.where(noise_mask[..., None], ab.sqrt() * z0 + (1 - ab).sqrt() * eps, z0)
    x0_hat = m(z_t, t)
    target = z0.clone()
    target[0] = emb[0]  # t = 0: the target is Emb(w) itself
    fm = noise_mask.float()
    mse = masked_mean((x0_hat - target).pow(2), fm)
    logp = torch.log_softmax(m.logits(z0), -1).gather(-1, ids[..., None])[..., 0]
    nll = masked_mean(-logp, fm)
    t_T = masked_mean((g.alphabar[-1].sqrt().float() * z0).pow(2), fm)
    assert torch.allclose(out.per_example, mse + nll + t_T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown loss average"):
        g.loss(m, ids, noise_mask, t, average="source")


@pytest.mark.parametrize("schedule,T,noise", [("sqrt", 2000, 0.05), ("sqrt", 100, 0.1), ("cosine", 300, 0.02),
                                              ("linear", 50, 0.3)])
def test_neighbourhoods_released_and_complete(schedule, T, noise):
    """released: the transcription of Tang et al.'s fill_noise_map; complete: brute force."""
    g = GaussianDiffusion(gaussian_betas(schedule, T))
    a = g.sqrt_1m_ab
    up_map, down_map = fill_noise_map(a.tolist(), noise)
    lo, hi = g.neighbourhoods(noise, "released")
    for t in range(T):
        assert int(hi[t]) == up_map.get(t, t) and int(lo[t]) == down_map.get(t, t), t
    lo, hi = g.neighbourhoods(noise, "complete")
    for t in range(T):
        inside = ((a - a[t]).abs() <= noise).nonzero().flatten()
        assert int(lo[t]) == int(inside.min()) and int(hi[t]) == int(inside.max()), t
    # the released maps leave the top of the chain without a step above it
    assert len(up_map) < T - 1


def test_released_maps_at_the_paper_setting():
    g = GaussianDiffusion(gaussian_betas("sqrt", 2000))
    lo, hi = g.neighbourhoods(0.05, "released")
    no_up = (hi == torch.arange(2000)).nonzero().flatten()
    no_down = (lo == torch.arange(2000)).nonzero().flatten()
    # a_t = sqrt(1 - alphabar_t) is within 0.05 of a_1999 from t = 1632 on (0.04990 there, 0.05005 at
    # 1631), and only a_1 is within 0.05 of a_0 (0.0320; a_2 - a_0 = 0.0531)
    a = g.sqrt_1m_ab
    assert float(a[-1] - a[1632]) <= 0.05 < float(a[-1] - a[1631])
    assert no_up.tolist() == list(range(1632, 2000))
    assert float(a[1] - a[0]) <= 0.05 < float(a[2] - a[0]) and no_down.tolist() == [0, 1]
    # so with the released maps about 18.4% of the t drawn uniformly have no step above them


def released_draw(g, t, noise, u):
    """t' by the transcribed make_t_similar_by_noise: direction up iff u[0] >= 1/2; randint(lo, hi) as
    lo + floor(u[1] * (hi - lo + 1))."""
    up_map, down_map = fill_noise_map(g.sqrt_1m_ab.tolist(), noise)
    pick = lambda i, lo, hi: lo + math.floor(float(u[1, i]) * (hi - lo + 1))
    t2, mask = t_similar_by_noise(t.tolist(), up_map, down_map, [bool(x >= 0.5) for x in u[0]], pick)
    return torch.tensor(t2), torch.tensor(mask)


def test_neighbour_draw_is_the_released_rule():
    g = GaussianDiffusion(gaussian_betas("sqrt", 2000))
    t = torch.randint(0, 2000, (3000,), generator=torch.Generator().manual_seed(0))
    t = torch.cat([t, torch.tensor([0, 0, 1, 1999, 1999, 1700])])
    t2, valid = g.neighbour_steps(t, 0.05, "released", generator=torch.Generator().manual_seed(1))
    u = torch.rand((2, len(t)), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    e2, emask = released_draw(g, t, 0.05, u)
    assert torch.equal(t2, e2) and torch.equal(valid, emask)
    assert (~valid).sum() > 100 and (t2[t >= 1632] <= t[t >= 1632]).all()  # top: only steps below


@pytest.mark.parametrize("lam,ts", [(-2.0, [3, 50, 98]), (-0.5, [0, 1, 99]), (0.0, [20, 60, 97])])
def test_post_train_loss_is_tangs_released_loss(lam, ts):
    """The post-training loss against a transcription of Tang et al.'s released training_losses_seq2seq
    (l2_noise_random), with the same noise and the same draw of t'."""
    m, g = tiny_model(1), GaussianDiffusion(gaussian_betas("sqrt", 100))
    ids, noise_mask = tiny_batch()
    t, noise, w = torch.tensor(ts), 0.1, torch.tensor([0.3, 1.0, 2.5])
    out = g.post_train_loss(m, ids, noise_mask, t, w, simi_lambda=lam, simi_noise=noise,
                            generator=torch.Generator().manual_seed(11))

    gen = torch.Generator().manual_seed(11)  # our draw order: z0's noise, t', z_t's noise, z_t''s noise
    emb = m.embed(ids)
    x_start = emb + math.sqrt(1 - float(g.alphabar[0])) * torch.randn(emb.shape, generator=gen)
    u = torch.rand((2, 3), generator=gen, dtype=torch.float64)
    t2, tt_mask = released_draw(g, t, noise, u)
    eps, eps2 = torch.randn(emb.shape, generator=gen), torch.randn(emb.shape, generator=gen)
    terms = tang_losses(m, m.logits, g.alphabar, ids, noise_mask.long(), t, t2, tt_mask, emb, x_start, eps, eps2, lam)
    assert torch.allclose(out.per_example, terms["loss"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.loss, (w * terms["loss"]).mean(), rtol=1e-5)  # the weights cover the penalty
    assert torch.allclose(-lam * out.penalty, terms["l2"] * tt_mask, rtol=1e-5, atol=1e-7)
    if lam:
        assert tt_mask.any() and (out.penalty[tt_mask] > 0).all()


# Tang et al.'s README, the post-training command: --simi_penalty l2_noise_random --simi_lambda -2 --simi_noise 0.05
RELEASED_SIMI = {"simi_penalty": "l2_noise_random", "simi_lambda": -2.0, "simi_noise": 0.05}


def test_post_train_penalty_weight_is_one_at_the_released_lambda():
    """At the README's lambda the transcribed released loss adds mean_flat((f(z_t') - f(z_t))^2) with weight 1
    (its l2 term / 2); ours adds the same amount to the loss at lambda 0, from the same draws. The config's
    defaults are the README's values."""
    from runtime.config import TrainConfig
    m, g = tiny_model(1), GaussianDiffusion(gaussian_betas("sqrt", 100))
    ids, noise_mask = tiny_batch()
    t, lam, noise = torch.tensor([30, 50, 70]), RELEASED_SIMI["simi_lambda"], 0.1
    outs = {la: g.post_train_loss(m, ids, noise_mask, t, simi_lambda=la, simi_noise=noise,
                                  generator=torch.Generator().manual_seed(5)) for la in (0.0, lam)}
    gen = torch.Generator().manual_seed(5)  # our draw order, as in test_post_train_loss_is_tangs_released_loss
    emb = m.embed(ids)
    x_start = emb + math.sqrt(1 - float(g.alphabar[0])) * torch.randn(emb.shape, generator=gen)
    t2, tt_mask = released_draw(g, t, noise, torch.rand((2, 3), generator=gen, dtype=torch.float64))
    eps, eps2 = torch.randn(emb.shape, generator=gen), torch.randn(emb.shape, generator=gen)
    with torch.no_grad():
        terms = tang_losses(m, m.logits, g.alphabar, ids, noise_mask.long(), t, t2, tt_mask, emb, x_start, eps, eps2, lam)
        x_t = torch.where(noise_mask[..., None], g.sqrt_ab[t].float()[:, None, None] * x_start
                          + g.sqrt_1m_ab[t].float()[:, None, None] * eps, x_start)
        x_t2 = torch.where(noise_mask[..., None], g.sqrt_ab[t2].float()[:, None, None] * x_start
                           + g.sqrt_1m_ab[t2].float()[:, None, None] * eps2, x_start)
        squared = ((m(x_t2, t2) - m(x_t, t)) ** 2).mean(dim=(1, 2))  # mean_flat, by hand
    assert tt_mask.any()
    torch.testing.assert_close(terms["l2"] / 2, squared, rtol=1e-5, atol=1e-8)  # the released weight is 1
    torch.testing.assert_close(outs[lam].per_example.detach() - outs[0.0].per_example.detach(), squared * tt_mask,
                               rtol=1e-4, atol=1e-7)
    cfg = TrainConfig()
    assert (cfg.simi_lambda, cfg.simi_noise) == (RELEASED_SIMI["simi_lambda"], RELEASED_SIMI["simi_noise"])
    with pytest.raises(ValueError, match="simi_lambda must be <= 0"):
        g.post_train_loss(m, ids, noise_mask, t, simi_lambda=0.5)


def test_self_renoise_variant_matches_a_direct_computation():
    """The paper-figure variant (ours): z_t' is the detached prediction at t re-noised to t'; the rest is
    the released loss."""
    m, g = tiny_model(1), GaussianDiffusion(gaussian_betas("sqrt", 100))
    ids, noise_mask = tiny_batch()
    t, lam, noise = torch.tensor([3, 50, 98]), -2.0, 0.1
    out = g.post_train_loss(m, ids, noise_mask, t, simi_lambda=lam, simi_noise=noise, variant="self_renoise",
                            maps="complete", generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    emb = m.embed(ids)
    z0 = emb + math.sqrt(float(g.betas[0])) * torch.randn(emb.shape, generator=gen)
    u = torch.rand((2, 3), generator=gen, dtype=torch.float64)
    a = g.sqrt_1m_ab
    t2, valid = t.clone(), torch.zeros(3, dtype=torch.bool)
    for i, ti in enumerate(t.tolist()):  # the complete neighbourhood, brute force, ascending (randint order)
        below = bool(u[0, i] < 0.5)
        side = [s for s in range(100) if abs(float(a[s] - a[ti])) <= noise and (s < ti if below else s > ti)]
        if side:
            t2[i], valid[i] = side[math.floor(float(u[1, i]) * len(side))], True

    def noised(x0, tt):
        ab = g.alphabar[tt].float()[:, None, None]
        return torch.where(noise_mask[..., None], ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=gen), z0)

    f1 = m(noised(z0, t), t)
    f2 = m(noised(f1.detach(), t2), t2)
    mse = lambda f: (f - emb).pow(2).mean((1, 2))
    logp = torch.log_softmax(m.logits(z0), -1).gather(-1, ids[..., None])[..., 0]
    t_T = (g.alphabar[-1].sqrt().float() * z0).pow(2).mean((1, 2))
    penalty = (f1 - f2).pow(2).mean((1, 2)) * valid
    per = 0.5 * (mse(f1) + mse(f2) + 2 * -logp.mean(1) + 2 * t_T - lam * penalty)
    assert torch.allclose(out.per_example, per, rtol=1e-5, atol=1e-6)


def test_nearest_embedding_is_the_l2_argmin():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(300, 8, generator=gen) * torch.rand(300, 1, generator=gen) * 3  # rows of varied norm
    z = torch.randn(1000, 8, generator=gen) * 2
    got = GaussianDiffusion.nearest_embedding(z, table, chunk=128)
    oracle = ((z[:, None, :].double() - table[None].double()) ** 2).sum(-1).argmin(-1)
    assert torch.equal(got, oracle)
    # the nearest is not the largest dot product when norms differ (DiffuSeq's final-step mismatch)
    assert (got != (z @ table.t()).argmax(-1)).any()


@pytest.mark.parametrize("V", [5, 256, 300, 700])
def test_nearest_embedding_returns_the_first_of_exact_ties(V):
    """Brute force in float64 against the fast path (cached |e|^2, 256-column blocks). Entries are small
    integers, so every float32 distance is exact and ties are exact: the first nearest row must win,
    also when the tied rows lie in different blocks. V below, at and across block multiples."""
    gen = torch.Generator().manual_seed(V)
    table = torch.randint(-1, 2, (V, 4), generator=gen).float()  # 81 distinct rows at most: many duplicates
    table[-1] = table[0]
    z = torch.randint(-2, 3, (400, 4), generator=gen).float()
    dist = ((z[:, None, :].double() - table[None].double()) ** 2).sum(-1)
    oracle = dist.argmin(-1)  # the first minimum
    assert ((dist == dist.min(-1, keepdim=True).values).sum(-1) > 1).float().mean() > 0.2  # ties are common
    index = EmbeddingIndex.build(table, torch.float32)
    for chunk in (7, 4096):
        assert torch.equal(GaussianDiffusion.nearest_embedding(z, table, chunk=chunk), oracle)
        assert torch.equal(GaussianDiffusion.nearest_embedding(z, index, chunk=chunk), oracle)


def test_excluded_rows_are_never_the_nearest():
    """An index built with ``exclude`` (as ``sample(exclude=...)`` builds it) returns the float64 brute-force
    nearest among the other rows only, also in another dtype than it was built in."""
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(300, 8, generator=gen)
    excluded = [0, 5, 299]
    z = torch.cat([table[excluded] + 1e-3, torch.randn(200, 8, generator=gen)])  # some sit on an excluded row
    dist = ((z[:, None, :].double() - table[None].double()) ** 2).sum(-1)
    dist[:, excluded] = float("inf")
    index = EmbeddingIndex.build(table, torch.float32, excluded)
    assert torch.equal(GaussianDiffusion.nearest_embedding(z, index), dist.argmin(-1))
    assert torch.equal(GaussianDiffusion.nearest_embedding(z.double(), index), dist.argmin(-1))


@pytest.mark.parametrize("V", [1, 255, 256, 257, 1000])
def test_block_argmin_is_min_indices(V):
    """The two-level reduction returns exactly ``d.min(-1).indices``: the first minimum, exact ties
    planted across blocks, and NaN counting as the minimum."""
    gen = torch.Generator().manual_seed(V)
    d = torch.randint(0, 50, (64, V), generator=gen).float()
    d[:8, -1] = -1.0
    d[:8, 0] = -1.0  # a tie between the first and the last column
    d[8:16, V // 2] = float("nan")
    d[16:24, :] = 3.0
    assert torch.equal(_first_argmin(d), d.min(-1).indices)


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


@pytest.mark.parametrize("n", [4, 10])
def test_respaced_sampling_is_diffuseqs_spaced_p_sample_loop(n):
    """Our adp_N chain against a transcription of SpacedDiffusion + p_sample_loop (Tang et al.'s
    sample_seq2seq.py settings: clamping to the L2-nearest row at every step, clip_denoised False, fixed-large
    variance, the source reset to Emb(w)), from the same noise. The schedule and the kept steps come from the
    transcription too (sqrt betas, space_timesteps' adp)."""
    T = 100
    m, g = tiny_model(3), GaussianDiffusion(gaussian_betas("sqrt", T))
    torch.testing.assert_close(g.betas, sqrt_betas(T), rtol=1e-12, atol=0)
    ids, noise_mask = tiny_batch()
    kept = sorted(space_timesteps_adp(T, n))
    out = g.sample(m, ids, noise_mask, kept, generator=torch.Generator().manual_seed(0))

    gen = torch.Generator().manual_seed(0)
    seen = []

    def model(x, ts):  # _WrappedModel hands over timestep_map[t]; our network rescales it by 1000 / T itself
        seen.append(int(ts[0]))
        return m(x, ts)

    emb = m.embedding_weight.detach()
    sd = SpacedDiffusion(kept, sqrt_betas(T))
    with torch.no_grad():
        x_start = m.embed(ids)
        mask = noise_mask[..., None].expand_as(x_start).long()
        x_noised = torch.where(mask == 0, x_start, torch.randn(x_start.shape, generator=gen))
        outs = sd.p_sample_loop(model, x_noised, lambda x, t: denoised_fn_round(emb, x, t), mask, x_start,
                                lambda shape: torch.randn(shape, generator=gen))
    assert seen == kept[::-1] and len(outs) == n == out.network_calls
    final = outs[-1]["sample"]
    torch.testing.assert_close(out.z0, final, rtol=0, atol=2e-5)
    # the last step returns the clamped prediction: its rows are the tokens (ours: x0)
    assert torch.equal(out.x0[noise_mask], get_efficient_knn(emb, final[noise_mask]))
    assert torch.equal(out.x0[~noise_mask], ids[~noise_mask])
    # one step in the middle, from the transcription's own input: our step equals its p_sample
    k = n // 2
    t, s = kept[::-1][k], kept[::-1][k + 1]
    z = outs[k - 1]["sample"]
    with torch.no_grad():
        ours = g.step(m(z, torch.full((3,), t)), t, s, z, noise_mask, x_start, emb,
                      generator=torch.Generator().manual_seed(1)).prev_sample
        theirs = sd.p_sample(m, z, torch.full((3,), n - 1 - k), lambda x, tt: denoised_fn_round(emb, x, tt), mask,
                             x_start, torch.randn(z.shape, generator=torch.Generator().manual_seed(1)))["sample"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
