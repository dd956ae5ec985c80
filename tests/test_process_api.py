"""The shared process interface: ``timesteps(spec)`` grids, ``step`` given a model output (no network),
the Gaussian sampling loop against a plain transcription of the posterior mean formula, and the
sharded inference plumbing ``dist.map_batches`` (one process and two gloo ranks)."""
from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from diffusion import AbsorbingDiffusion, GaussianDiffusion, Mutual, StepOutput, gaussian_betas, parse_respacing
from models import DiffuSeqTransformer
from runtime import dist


pytestmark = pytest.mark.usefixtures("single_thread")


def hand_coefficients(alphabar: list[float], t: int, s: int):
    """Ho et al. (2020), Eq. 7 on the step t -> s, in Python floats; alphabar_{-1} = 1 (the data)."""
    ab_t, ab_s = alphabar[t], (1.0 if s == -1 else alphabar[s])
    beta = 1 - ab_t / ab_s
    return beta, beta * math.sqrt(ab_s) / (1 - ab_t), (1 - ab_s) * math.sqrt(1 - beta) / (1 - ab_t)


# ---------------------------------------------------------------- timesteps(spec)

def test_gaussian_timesteps_are_the_kept_steps_descending_then_the_data():
    g = GaussianDiffusion(gaussian_betas("sqrt", 50))
    assert g.timesteps(None).tolist() == list(range(49, -1, -1)) + [-1] == g.timesteps("full").tolist()
    assert g.timesteps("uniform_2").tolist() == [49, 0, -1]
    assert g.timesteps("0, 10,49").tolist() == [49, 10, 0, -1] == g.timesteps([10, 0, 49]).tolist()
    assert g.timesteps(torch.tensor([0, 25])).tolist() == [25, 0, -1]
    for spec in ("adp_10", "uniform_7"):
        assert g.timesteps(spec).tolist() == parse_respacing(spec, 50)[::-1] + [-1]
    assert g.timesteps("adp_10").dtype == torch.long
    for bad in ([5, 10], [0, 0, 3], [0, 50], [], "5,10", "adp_1"):
        with pytest.raises(ValueError):
            g.timesteps(bad)


def test_absorbing_timesteps_run_from_T_to_the_data():
    grid = AbsorbingDiffusion(Mutual(), 64, mask_id=3).timesteps(8)
    assert grid.tolist() == [64, 56, 48, 40, 32, 24, 16, 8, 0]


def respaced_chain(alphabar: torch.Tensor, kept: list[int]):
    """The respaced chain as the sampler computed it before ``timesteps(spec)``, on the kept steps
    ascending: ``beta'_i = 1 - abar[k_i] / abar[k_{i-1}]`` (``abar[k_{-1}] = 1``), Eq. 7's coefficients."""
    ab = alphabar[torch.tensor(kept)]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    betas = 1 - ab / ab_prev
    return betas, betas * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)


@pytest.mark.parametrize("spec", ["full", "uniform_7", "adp_20", [0, 1, 2, 1500, 1999]])
def test_gaussian_step_pairs_give_the_respaced_coefficients_exactly(spec):
    """Each consecutive (t, s) of the grid gives beta = 1 - abar_t / abar_s and the posterior mean
    coefficients: bit for bit those of the respaced chain, one step at a time (as ``step`` computes them)
    or all at once, and the hand formula in Python floats up to rounding (torch's float64 sqrt is not
    always the correctly rounded one)."""
    g = GaussianDiffusion(gaussian_betas("sqrt", 2000))
    grid = g.timesteps(spec)
    kept = grid[:-1].flip(0).tolist()
    chain = [c.flip(0) for c in respaced_chain(g.alphabar, kept)]  # descending, as the grid
    together = g.posterior_coefficients(grid[:-1], grid[1:])
    assert all(c.dtype == torch.float64 for c in together)
    ab = g.alphabar.tolist()
    for k, (t, s) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist())):
        one = [float(c) for c in g.posterior_coefficients(torch.tensor(t), torch.tensor(s))]
        assert one == [float(c[k]) for c in together] == [float(c[k]) for c in chain], (t, s)
        assert one == pytest.approx(hand_coefficients(ab, t, s), rel=1e-14, abs=0), (t, s)
    # the last step goes to the data: it returns x0_hat itself
    assert (float(together[1][-1]), float(together[2][-1])) == (1.0, 0.0)
    # the respaced betas multiply back to alphabar at every kept step
    keep = torch.cumprod((1 - together[0]).flip(0), 0)
    assert torch.allclose(keep, g.alphabar[kept], rtol=1e-9, atol=0)


# ---------------------------------------------------------------- step: a model output in, no network

def test_gaussian_step_takes_the_model_output_and_draws_noise_only_before_the_data():
    g = GaussianDiffusion(gaussian_betas("sqrt", 100))
    gen = torch.Generator().manual_seed(0)
    B, L, D = 2, 6, 4
    x0_hat, z_t, z_src = (torch.randn(B, L, D, generator=gen) for _ in range(3))
    noise_mask = torch.arange(L)[None].expand(B, L) >= torch.tensor([[2], [3]])
    ab = g.alphabar.tolist()

    step_gen = torch.Generator().manual_seed(1)
    out = g.step(x0_hat, torch.full((B,), 30), torch.full((B,), 12), z_t, noise_mask, z_src, generator=step_gen)
    assert isinstance(out, StepOutput) and out.x0_tokens is None  # no table: no clamping
    beta, c_x0, c_zt = hand_coefficients(ab, 30, 12)
    eps = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1))
    expected = c_x0 * x0_hat + c_zt * z_t + math.sqrt(beta) * eps
    torch.testing.assert_close(out.prev_sample[noise_mask], expected[noise_mask], rtol=0, atol=1e-6)
    assert torch.equal(out.prev_sample[~noise_mask], z_src[~noise_mask])

    # to the data (s = -1): the mean is x0_hat itself and no noise is drawn
    state = step_gen.get_state()
    out = g.step(x0_hat, 5, -1, z_t, noise_mask, z_src, generator=step_gen)
    assert torch.equal(step_gen.get_state(), state)
    assert torch.equal(out.prev_sample[noise_mask], x0_hat[noise_mask])
    with pytest.raises(ValueError, match="one t"):
        g.step(x0_hat, torch.tensor([30, 29]), torch.tensor([12, 12]), z_t, noise_mask, z_src)


def test_gaussian_step_clamps_to_the_nearest_row_of_the_table():
    g = GaussianDiffusion(gaussian_betas("sqrt", 100))
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(30, 4, generator=gen)
    x0_hat, z_t = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)
    noise_mask = torch.ones(2, 5, dtype=torch.bool)
    noise_mask[:, 0] = False
    out = g.step(x0_hat, 0, -1, z_t, noise_mask, z_t, embedding_table=table)
    tokens = torch.cdist(x0_hat[noise_mask], table).argmin(-1)
    assert torch.equal(out.x0_tokens, tokens) and torch.equal(out.prev_sample[noise_mask], table[tokens])


def test_absorbing_step_takes_p_hat_and_reveals_everything_at_the_data():
    """With a one-hot p_hat and s = 0 every masked position becomes p_hat's token; nothing else changes."""
    V, MASK = 9, 3
    diff = AbsorbingDiffusion(Mutual(), 16, mask_id=MASK)
    x_t = torch.tensor([[1, MASK, 5, MASK], [1, MASK, MASK, 2]])
    noise_mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    targets = torch.tensor([4, 7, 8, 6])  # the N = 4 masked positions, row-major
    p_hat = torch.nn.functional.one_hot(targets, V).float()
    t, s = torch.full((2,), 4), torch.zeros(2, dtype=torch.long)
    out = diff.step(p_hat, t, s, x_t, noise_mask, torch.Generator().manual_seed(0))
    assert isinstance(out, StepOutput)
    assert out.prev_sample.tolist() == [[1, 4, 5, 7], [1, 8, 6, 2]]
    released = diff.step_released(p_hat, t, s, x_t, noise_mask, topk=1, generator=torch.Generator().manual_seed(0))
    assert released.prev_sample.tolist() == [[1, 4, 5, 7], [1, 8, 6, 2]]


# ---------------------------------------------------------------- the Gaussian loop: network, then step

class CountingNet(DiffuSeqTransformer):
    calls = 0

    def forward(self, z, t):
        CountingNet.calls += 1
        return super().forward(z, t)


def brute_nearest(z, table):
    """The L2-nearest row, by brute force in float64."""
    return ((z[:, None, :].double() - table[None].double()) ** 2).sum(-1).argmin(-1)


def transcribed_sample(m, alphabar: list[float], ids, noise_mask, kept: list[int], gen, clamp: bool = True):
    """DiffuSeq's p_sample loop on the kept steps, written out: clamping (or not), the posterior mean of
    Ho et al. (2020), Eq. 7 with betas recomputed from alphabar, plus sqrt(beta) eps before the last step;
    the tokens are those of the nearest embeddings (brute force in float64)."""
    B = ids.shape[0]
    z_src = m.embed(ids)
    z = torch.where(noise_mask[..., None], torch.randn(z_src.shape, generator=gen), z_src)
    table = m.embedding_weight
    steps = sorted(kept, reverse=True)
    for i, t in enumerate(steps):
        ab_t = alphabar[t]
        ab_s = alphabar[steps[i + 1]] if i + 1 < len(steps) else 1.0
        beta = 1 - ab_t / ab_s
        x0_hat = m(z, torch.full((B,), t))
        if clamp:
            x0_hat[noise_mask] = table[brute_nearest(x0_hat[noise_mask], table)]
        mean = (beta * math.sqrt(ab_s) / (1 - ab_t)) * x0_hat + ((1 - ab_s) * math.sqrt(1 - beta) / (1 - ab_t)) * z
        if i + 1 < len(steps):
            mean = mean + math.sqrt(beta) * torch.randn(z.shape, generator=gen)
        z = torch.where(noise_mask[..., None], mean, z_src)
    x0 = ids.clone()
    x0[noise_mask] = brute_nearest(z[noise_mask], table)
    return x0, z


@pytest.mark.parametrize("spec,clamp,V", [("adp_10", True, 40), ("uniform_5", True, 40), ([0, 1, 2, 60, 99], True, 40),
                                          ("adp_10", True, 700), ("adp_10", False, 40), ("full", False, 40)])
def test_gaussian_sample_equals_the_transcribed_loop(spec, clamp, V):
    """Token for token (V = 700: the table spans several of the clamp's 256-column blocks)."""
    torch.manual_seed(0)
    m = CountingNet(V, emb_dim=8, hidden_size=16, num_layers=1, num_heads=2, max_len=12, num_steps=100,
                    dropout=0.0).eval()
    g = GaussianDiffusion(gaussian_betas("sqrt", 100))
    ids = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(3))
    noise_mask = torch.arange(10)[None].expand(3, 10) >= torch.tensor([[4], [5], [6]])
    kept = parse_respacing(spec, 100) if isinstance(spec, str) else spec
    CountingNet.calls = 0
    out = g.sample(m, ids, noise_mask, spec, clamp=clamp, generator=torch.Generator().manual_seed(5))
    assert CountingNet.calls == out.network_calls == len(kept) and out.row_evaluations == 3 * len(kept)
    with torch.no_grad():
        x0, z0 = transcribed_sample(m, g.alphabar.tolist(), ids, noise_mask, kept, torch.Generator().manual_seed(5),
                                    clamp)
    assert torch.equal(out.x0, x0)
    torch.testing.assert_close(out.z0, z0, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- dist.map_batches

def _draws(b: int, gen: torch.Generator):
    return b, torch.rand(3, generator=gen).tolist()


def test_map_batches_in_one_process_runs_every_batch_in_order_with_its_seed():
    done = []
    out = dist.map_batches(5, _draws, dist.DistInfo(), seed=7, on_batch=done.append)
    assert done == [1, 2, 3, 4, 5]
    assert [b for b, _ in out] == list(range(5))
    for b, draws in out:
        assert draws == torch.rand(3, generator=torch.Generator().manual_seed(dist.batch_seed(7, b))).tolist()
    assert out[0][1] != out[1][1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _map_rank(rank: int, world: int, port: int, path: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    info = dist.DistInfo(rank, world)
    seen = []
    out = dist.map_batches(5, lambda b, gen: (rank, _draws(b, gen)), info, seed=7, on_batch=seen.append)
    assert len(seen) == len(dist.my_batches(5, info))
    if rank == 0:
        torch.save(out, path)
    else:
        assert out is None
    dist.finish(info)


def test_map_batches_under_two_ranks_equals_one_process(tmp_path):
    path = str(tmp_path / "out.pt")
    mp.spawn(_map_rank, args=(2, free_port(), path), nprocs=2, join=True)
    out = torch.load(path)
    assert [rank for rank, _ in out] == [0, 1, 0, 1, 0]  # batch b computed by rank b mod 2
    assert [r for _, r in out] == dist.map_batches(5, _draws, dist.DistInfo(), seed=7)


# ---------------------------------------------------------------- one registry per list of names

def test_every_registered_name_is_built_and_every_process_has_its_parts():
    import predict_downstream_condition as pdc
    from diffusion import ALL_SCHEDULES, GAUSSIAN_SCHEDULES, PROCESS_SCHEDULES, PROCESSES, SCHEDULES, make_schedule
    from runtime.assemble import PROCESS_PARTS
    from runtime.config import PROCESS_SCHEDULES as CONFIG_PROCESSES

    for name in SCHEDULES:
        make_schedule(name, counts=torch.ones(6))
    for name in GAUSSIAN_SCHEDULES:
        assert gaussian_betas(name, 10).shape == (10,)
    assert sorted(ALL_SCHEDULES) == sorted(set(SCHEDULES) | set(GAUSSIAN_SCHEDULES))
    assert PROCESSES == tuple(PROCESS_SCHEDULES)  # the diffusion processes; the AR baseline is no diffusion
    assert tuple(PROCESS_PARTS) == tuple(pdc.DECODINGS) == (*PROCESSES, "autoregressive") == tuple(CONFIG_PROCESSES)
