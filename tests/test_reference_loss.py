"""The dense [B, L, V] training loss of ``diffusion/reference.py`` (what ``bench.py --reference`` times)
against the fast ``AbsorbingDiffusion.loss``: the same value and gradient at the same draws, on a toy
vocabulary and on a tiny BERT with the real 30522-entry vocabulary (the check bench.py used to make),
and the dense loss draws t and x_t by the forward process."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion import AbsorbingDiffusion, Mutual, Spindle, make_schedule
from diffusion.reference import dense_loss, dense_loss_at

V, PAD, CLS, SEP, MASK = 12, 0, 1, 2, 3
COUNTS = torch.tensor([0, 60, 60, 0, 1000, 400, 150, 60, 20, 6, 2, 1], dtype=torch.float64)
SCHEDULES = {"mutual": lambda: Mutual(), "spindle-0.3": lambda: Spindle(COUNTS, lam=0.3, form="released", pad_id=PAD)}


pytestmark = pytest.mark.usefixtures("single_thread")


class TinyDenoiser(torch.nn.Module):
    """Logits from a per-position token embedding plus a bag-of-tokens context: [N, V] at
    ``positions``, or [B, L, V] when ``positions`` is None (as ``BertDenoiser``)."""

    def __init__(self, L: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok = torch.nn.Parameter(torch.randn(L, V, V, generator=g))
        self.ctx = torch.nn.Parameter(0.5 * torch.randn(V, V, generator=g))

    def forward(self, x_t, t, attention_mask, positions=None):
        L = x_t.shape[1]
        logits = self.tok[torch.arange(L), x_t] + self.ctx[x_t].sum(1, keepdim=True)
        return logits if positions is None else logits[positions]


def rows(B: int, L: int, g: torch.Generator):
    """``[CLS] words [SEP] [PAD]..`` of random lengths; x0, noise_mask (the words), attention_mask."""
    x0 = torch.full((B, L), PAD, dtype=torch.long)
    for b in range(B):
        n = int(torch.randint(2, L - 1, (1,), generator=g))
        x0[b, 0], x0[b, n + 1] = CLS, SEP
        x0[b, 1:n + 1] = torch.randint(4, V, (n,), generator=g)
    nm = (x0 != PAD) & (x0 != CLS) & (x0 != SEP)
    return x0, nm, x0 != PAD


def replay(diff: AbsorbingDiffusion, x0, nm, seed: int):
    """The t and x_t that ``diff.loss(..., generator=Generator().manual_seed(seed))`` draws."""
    g = torch.Generator().manual_seed(seed)
    t = diff.sample_t(x0.shape[0], x0.device, False, g)
    return t, diff.q_sample(x0, t, nm, g)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_fast_loss_equals_the_dense_loss_in_value_and_gradient(name):
    sched, T, hybrid = SCHEDULES[name](), 30, 0.25
    diff = AbsorbingDiffusion(sched, T, MASK, hybrid_lambda=hybrid)
    x0, nm, am = rows(16, 9, torch.Generator().manual_seed(1))
    model = TinyDenoiser(9, seed=2)

    fast = diff.loss(model, x0, nm, am, generator=torch.Generator().manual_seed(7)).loss
    fast_grad = torch.autograd.grad(fast, list(model.parameters()))
    t, x_t = replay(diff, x0, nm, 7)
    assert int(((x_t == MASK) & nm).sum()) >= 20  # the KL and the CE both have terms
    dense = dense_loss_at(model(x_t, t, am, None), x0, x_t, t, nm, sched, T, MASK, hybrid)
    dense_grad = torch.autograd.grad(dense, list(model.parameters()))

    dense = dense.detach()
    assert dense.dtype == torch.float64 and math.isfinite(float(dense)) and float(dense) > 0
    torch.testing.assert_close(fast.detach().double(), dense, rtol=1e-5, atol=1e-7)
    for a, b in zip(fast_grad, dense_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(float(gr.abs().sum()) for gr in dense_grad) > 0


def test_dense_loss_counts_no_masked_position_as_zero_cross_entropy():
    """At t = 1 few tokens are masked; a batch with none gives 0 (as the fast loss), not NaN."""
    sched, T = Mutual(), 30
    x0, nm, am = rows(4, 9, torch.Generator().manual_seed(3))
    model = TinyDenoiser(9, seed=4)
    t = torch.ones(4, dtype=torch.long)
    with torch.no_grad():
        dense = dense_loss_at(model(x0, t, am, None), x0, x0, t, nm, sched, T, MASK, 0.25)
    assert 0.0 <= float(dense) < 1e-12  # nothing masked: every KL is a carry-over (0), no CE term


def test_fast_bound_equals_the_dense_one_on_a_bert_with_the_real_vocabulary(tiny_bert):
    """bench.py's configuration (BertDenoiser, V 30522, spindle on Zipf counts, T 2048) on a tiny
    BERT: the float32 fast loss equals the float64 dense one at the same t, x_t and network."""
    from common.loading import load_masked_lm
    from models import BertDenoiser

    mlm, tok, _ = load_masked_lm(tiny_bert, log=lambda *a, **k: None)
    denoiser = BertDenoiser(mlm, "none", 2048).eval()  # no dropout: both losses see the same network
    V_bert, mask_id, T = mlm.config.vocab_size, tok.mask_token_id, 2048
    specials = [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, mask_id, tok.unk_token_id]
    counts = 1e6 / torch.arange(1, V_bert + 1, dtype=torch.float64)
    counts[specials] = 0
    sched = make_schedule("spindle", counts=counts, lam=0.3, form="released", pad_id=tok.pad_token_id)
    diff = AbsorbingDiffusion(sched, T, mask_id, hybrid_lambda=0.01)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(1000, V_bert, (3, 12), generator=g)
    x0[:, 0], x0[:, -1] = tok.cls_token_id, tok.sep_token_id
    nm = torch.zeros_like(x0, dtype=torch.bool)
    nm[:, 1:-1] = True
    am = torch.ones_like(x0)

    with torch.no_grad():
        fast = diff.loss(denoiser, x0, nm, am, generator=torch.Generator().manual_seed(5)).loss
        t, x_t = replay(diff, x0, nm, 5)
        dense = dense_loss_at(denoiser(x_t, t, am, None), x0, x_t, t, nm, sched, T, mask_id, 0.01)
    assert int(((x_t == mask_id) & nm).sum()) >= 5
    assert float(dense) > 0
    assert abs(float(fast) - float(dense)) <= 1e-5 * abs(float(dense))


def test_dense_loss_draws_t_uniformly_and_x_t_from_the_forward_process():
    """``dense_loss`` feeds the network t uniform on {1..T} and x_t ~ q(x_t | x0), and returns the
    dense loss at exactly those draws."""
    sched, T, B = Mutual(), 8, 4000
    x0 = torch.tensor([[CLS, 4, 5, 6, 7, 8, SEP, PAD]]).expand(B, -1).clone()
    nm = (x0 >= 4)
    am = x0 != PAD
    model = TinyDenoiser(8, seed=5)
    seen = {}

    def denoise(x_t, t, attention_mask, positions):
        assert positions is None  # the dense design computes the logits at every position
        seen.update(x_t=x_t, t=t)
        return model(x_t, t, attention_mask, positions)

    loss = dense_loss(denoise, x0, nm, am, sched, T, MASK, V, 0.1, generator=torch.Generator().manual_seed(11))
    t, x_t = seen["t"], seen["x_t"]
    # t: uniform on 1..T (each count within 5 binomial standard deviations)
    counts = torch.bincount(t, minlength=T + 1)
    assert int(counts[0]) == 0 and int(t.max()) <= T
    sd = math.sqrt(B * (1 / T) * (1 - 1 / T))
    assert float((counts[1:].double() - B / T).abs().max()) < 5 * sd
    # x_t: only noised positions change, only to [MASK], at rate 1 - alpha_t
    assert bool((x_t[~nm] == x0[~nm]).all()) and bool(((x_t == x0) | (x_t == MASK)).all())
    p = (1 - sched.alpha(t.double() / T, x0, nm).double()).expand(B, x0.shape[1])[nm]
    n_masked = int((x_t == MASK).sum())
    assert abs(n_masked - float(p.sum())) < 5 * math.sqrt(float((p * (1 - p)).sum()))
    with torch.no_grad():
        again = dense_loss_at(model(x_t, t, am, None), x0, x_t, t, nm, sched, T, MASK, 0.1)
    torch.testing.assert_close(loss.detach(), again, rtol=0, atol=0)
