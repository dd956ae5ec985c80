"""MDLM's continuous-time objective on the absorbing process (Sahoo et al. 2024, Eq. 10; docs/algorithms.md §1.14).

Time s runs over [0, 1] and a token-independent schedule gives ``alpha(s)``, the probability that a clean token is
still unmasked. The negative ELBO of a sentence ``x0`` is

    NELBO = int_0^1 w(s) E_{x_s ~ q(. | x0)}[ sum over masked l of -log p_hat(x0^l | x_s) ] ds + J,
    w(s) = -alpha'(s) / (1 - alpha(s)),

under the SUBS parameterisation: ``p_hat`` never predicts [MASK] (its logit is -inf) and an unmasked position carries
its token over, so only masked positions pay. ``J = end_jump * sum_l -log p_hat(x0^l | all [MASK])`` is the KL of
the schedule's jump to all-[MASK] at s = 1 (0 unless ``alpha(1-) > 0``, as for ``loglinear``). With the log-linear
schedule ``w = 1/s``: a 1/s-weighted masked-LM loss. MDLM writes the weight as ``sigma' / expm1(sigma)`` with
``sigma = -log alpha``, the same number.

The network sees the discrete time ``ceil(s T)`` in ``1..T``, the value the sampler's integer grid gives it (a
time-agnostic network ignores it). Only the masked positions go through the vocabulary projection.
"""
from __future__ import annotations

import torch

from .absorbing import AbsorbingDiffusion, Denoiser, LossOutput
from .schedules import Schedule

# --objective: discrete (the T-step bound of §1.6, weighted by --loss_weighting) or mdlm (this module)
OBJECTIVES = ("discrete", "mdlm")
SAMPLING_EPS = 1e-3  # MDLM's training.sampling_eps: training draws t in [eps, 1] (the weight 1/t stays finite)


def check_schedule(schedule: Schedule) -> None:
    """ValueError for a token-dependent schedule: the weight above needs one ``alpha`` for every token."""
    if schedule.token_dependent:
        raise ValueError(f"the continuous-time objective needs a token-independent schedule; {schedule.name} is "
                         "token-dependent (its state-dependent form, MD4's, is not implemented)")


def sample_t(n: int, device, low_discrepancy: bool = False, eps: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` times in ``[eps, 1)``, [n] float64: uniform, or with ``low_discrepancy`` one uniform draw in each of
    the n strata ``[i/n, (i+1)/n)`` (MDLM's ``_sample_t`` with antithetic sampling), mapped to ``[eps, 1)``."""
    u = torch.rand(n, device=device, dtype=torch.float64, generator=generator)
    if low_discrepancy:
        u = (u + torch.arange(n, device=device, dtype=torch.float64)) / n
    return eps + (1.0 - eps) * u


def weight(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """``w(t) = -alpha'(t) / (1 - alpha(t))`` for ``t`` [B] in (0, 1), [B] float64 (MDLM Eq. 10)."""
    return -schedule.dalpha(t) / (1.0 - schedule.alpha(t).squeeze(-1))


def network_time(t: torch.Tensor, T: int) -> torch.Tensor:
    """The integer time the network sees for continuous ``t`` [B]: ``ceil(t T)`` in ``1..T``, [B] long."""
    return torch.ceil(t * T).long().clamp(1, T)


def mask_at(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise_mask: torch.Tensor, mask_id: int,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """``x_t ~ q(x_t | x0)`` at continuous ``t`` [B]: each noised token of ``x0`` [B, L] is [MASK] with probability
    ``1 - alpha(t)``. [B, L]."""
    u = torch.rand(x0.shape, device=x0.device, dtype=torch.float64, generator=generator)
    return x0.masked_fill((u >= schedule.alpha(t)) & noise_mask, mask_id)


def masked_ce(process: AbsorbingDiffusion, denoise: Denoiser, x0: torch.Tensor, x_t: torch.Tensor,
              t_net: torch.Tensor, noise_mask: torch.Tensor, attention_mask: torch.Tensor):
    """``-log p_hat(x0)`` under SUBS at the N masked positions of ``x_t`` [B, L]: (per example [B], per position [N],
    masked [B, L]). Unmasked positions carry their token over, so they cost nothing and are not evaluated."""
    masked = (x_t == process.mask_id) & noise_mask
    logp = process.log_p_hat(denoise(x_t, t_net, attention_mask, masked))  # [MASK] logit -inf
    ce_pos = -logp.gather(-1, x0[masked][:, None]).squeeze(-1)
    ce_b = torch.zeros(x0.shape[0], device=x0.device, dtype=ce_pos.dtype).index_add_(0, masked.nonzero()[:, 0], ce_pos)
    return ce_b, ce_pos, masked


def loss_at(process: AbsorbingDiffusion, denoise: Denoiser, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
            noise_mask: torch.Tensor, attention_mask: torch.Tensor):
    """The loss at a given ``x_t`` [B, L] and continuous ``t`` [B]: (``w(t) * sum of -log p_hat(x0)`` over the masked
    positions [B], the per-position cross-entropies [N], masked [B, L])."""
    ce_b, ce_pos, masked = masked_ce(process, denoise, x0, x_t, network_time(t, process.T), noise_mask, attention_mask)
    return weight(process.schedule, t).to(ce_b.dtype) * ce_b, ce_pos, masked


def loss(process: AbsorbingDiffusion, denoise: Denoiser, x0: torch.Tensor, noise_mask: torch.Tensor,
         attention_mask: torch.Tensor, low_discrepancy: bool = False, generator: torch.Generator | None = None,
         sampling_eps: float = SAMPLING_EPS) -> LossOutput:
    """MDLM's training loss: one t per example in ``[sampling_eps, 1)`` (stratified over the batch with
    ``low_discrepancy``), ``x_t ~ q``, and ``w(t) * sum of -log p_hat(x0)`` over the masked positions; the loss is
    its sum over the batch divided by the noised tokens (MDLM divides by the attention mask's tokens).
    ``nelbo`` [B] is that single-draw estimate per example, ``ce`` the mean cross-entropy over masked positions."""
    check_schedule(process.schedule)
    t = sample_t(x0.shape[0], x0.device, low_discrepancy, sampling_eps, generator)
    x_t = mask_at(process.schedule, x0, t, noise_mask, process.mask_id, generator)
    nelbo, ce_pos, masked = loss_at(process, denoise, x0, x_t, t, noise_mask, attention_mask)
    num_tokens, num_masked = noise_mask.sum(), masked.sum()
    return LossOutput(nelbo.sum() / num_tokens.clamp_min(1), nelbo.detach(),
                      (ce_pos.sum() / num_masked.clamp_min(1)).detach(), num_tokens, num_masked)


def _some_masked(x0: torch.Tensor, p: torch.Tensor, noise_mask: torch.Tensor, mask_id: int,
                 generator: torch.Generator | None) -> torch.Tensor:
    """``x_t`` [B, L] drawn from q conditioned on at least one masked position: the count m ~ Binomial(n, p) given
    m >= 1 (n noised positions, ``p`` [B] the masking probability), then a uniform subset of m noised positions
    (given m, every subset is equally likely under q). Rows with n = 0 stay as they are."""
    n = noise_mask.sum(-1, keepdim=True).double()                                       # [B, 1]
    m = torch.arange(x0.shape[1] + 1, device=x0.device, dtype=torch.float64)[None]      # [1, L + 1]
    p = p.double().clamp(1e-300, 1.0)[:, None]
    log_q = (torch.lgamma(n + 1) - torch.lgamma(m + 1) - torch.lgamma((n - m).clamp_min(0) + 1) + m * p.log()
             + torch.where(m < n, (n - m) * torch.log1p(-p), torch.zeros_like(m)))      # 0 * log(0) = 0 at m = n
    log_q = log_q.masked_fill((m > n) | (m == 0), float("-inf"))
    cdf = log_q.softmax(-1).cumsum(-1)
    u = torch.rand(x0.shape[0], 1, device=x0.device, dtype=torch.float64, generator=generator)
    count = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(x0.shape[1])  # [B, 1]
    keys = torch.rand(x0.shape, device=x0.device, dtype=torch.float64, generator=generator).masked_fill(~noise_mask, 2.0)
    rank = keys.argsort(-1).argsort(-1)
    return x0.masked_fill((rank < count) & noise_mask & (n > 0), mask_id)


def _draw_term(process: AbsorbingDiffusion, denoise: Denoiser, x0, t, noise_mask, attention_mask, generator):
    """One unbiased draw of ``w(t) E_q[sum over masked of -log p_hat(x0)]`` per example at ``t`` [B] in [0, 1), [B]
    float64: ``x_t`` is drawn given at least one masked position and the result scaled by ``P(m >= 1)``. The factor
    ``-alpha'(t) P(m >= 1) / (1 - alpha(t)) <= n |alpha'(t)|`` is bounded, so the 1/t weight near t = 0 has no
    heavy tail (plain masking would draw a huge weight times a rare masked token there)."""
    sch = process.schedule
    p = 1.0 - sch.alpha(t).squeeze(-1)                                       # masking probability, [B]
    n = noise_mask.sum(-1).double()
    hit = -torch.expm1(n * torch.log1p(-p.clamp_max(1.0))).nan_to_num(0.0)   # P(m >= 1) = 1 - (1 - p)^n
    ratio = torch.where(p > 1e-12, hit / p.clamp_min(1e-12), n)               # P(m >= 1) / p, n as p -> 0
    x_t = _some_masked(x0, p, noise_mask, process.mask_id, generator)
    ce_b, _, _ = masked_ce(process, denoise, x0, x_t, network_time(t, process.T), noise_mask, attention_mask)
    return -sch.dalpha(t) * ratio * ce_b.double()


@torch.no_grad()
def nelbo(process: AbsorbingDiffusion, denoise: Denoiser, x0: torch.Tensor, noise_mask: torch.Tensor,
          attention_mask: torch.Tensor, draws: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An unbiased Monte Carlo estimate of each example's continuous-time NELBO, [B] float64 in nats: the mean of
    ``draws`` terms at stratified times ``t_k = (k + u_k) / draws`` (one per stratum, independently per example;
    ``draws`` network calls), plus the jump term J computed exactly (one more call when ``end_jump > 0``).
    Every estimate is at most ``n max|alpha'| max CE + J``, so its variance is finite."""
    check_schedule(process.schedule)
    if draws < 1:
        raise ValueError(f"the continuous-time bound needs at least one draw of t, got {draws}")
    B = x0.shape[0]
    total = torch.zeros(B, device=x0.device, dtype=torch.float64)
    for k in range(draws):
        u = torch.rand(B, device=x0.device, dtype=torch.float64, generator=generator)
        total += _draw_term(process, denoise, x0, (k + u) / draws, noise_mask, attention_mask, generator)
    total /= draws
    jump = process.schedule.end_jump
    if jump > 0:
        x_1 = x0.masked_fill(noise_mask, process.mask_id)
        t_1 = torch.full((B,), process.T, device=x0.device, dtype=torch.long)
        total += jump * masked_ce(process, denoise, x0, x_1, t_1, noise_mask, attention_mask)[0].double()
    return total
