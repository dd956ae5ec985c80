"""Absorbing-state (masking) discrete diffusion with the x0-parameterisation (D3PM, DiffusionBERT).

Conventions (see docs/algorithms.md §1):

* ``T`` discrete steps, ``t = 0..T``; ``t = 0`` is the data and ``t = T`` all-[MASK]. A schedule
  gives ``alpha_t`` (probability a clean token is still unmasked), ``alpha_0 = 1``, ``alpha_T = 0``.
  The network sees the integer ``t`` of ``x_t`` (1..T; it is never called at the data, t = 0).
* :meth:`AbsorbingDiffusion.timesteps` gives the sampling grid ``T = t_0 > t_1 > ... > t_K = 0``;
  each consecutive pair ``(t, s)`` is one reverse step ``x_t -> x_s``. The sampling loop calls the
  network and then ``step(p_hat, t, s, x_t, noise_mask)``, which returns a
  :class:`~diffusion.outputs.StepOutput` and never calls the network.
* Only positions in ``noise_mask`` ([B, L] bool) are diffused; everything else (``[CLS]``,
  ``[SEP]``, padding, a seq2seq source) is never masked and never enters the loss.
* The denoiser is any callable ``denoise(x_t, t, attention_mask, positions) -> logits`` that
  returns ``[N, V]`` logits for the ``N = positions.sum()`` selected positions in row-major order,
  so the vocabulary projection is computed only where it is needed. The [MASK] logit is set to
  ``-inf`` here ("zero masking").
* Reverse step from t to s < t at a masked position: become v with probability
  ``p_hat(v) * w(v)``, ``w(v) = (alpha_s(v) - alpha_t(v)) / (1 - alpha_t(v))``, else stay [MASK].
  Unmasked positions keep their token (carry-over).

With a token-independent schedule the KL at a masked position is ``w * (-log p_hat(x0))``, so the
bound is a weighted cross-entropy. With spindle, ``q`` uses the true sentence statistic and the
reverse model a corpus constant (no x0 leak), and the exact KL of the two-outcome distributions is
used (:meth:`AbsorbingDiffusion.kl`). No ``[B, L, V]`` one-hot or transition tensor is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .noise import STREAM_TOKEN, STREAM_UNMASK, as_noise
from .outputs import SampleOutput, StepOutput
from .samplers import SAMPLERS, Sampler, categorical_from_uniform, make_sampler
from .schedules import Schedule

# Floor on the reverse model's unmask probability w(v). With a large spindle lambda the clipped
# schedule can give w(v) = 0 for a token that q still reveals, which would make the KL +inf; the
# floor keeps p(x_s | x_t) a valid distribution with full support, so the bound stays finite.
# Token-independent schedules never reach it (w >= 1/T there).
REVERSE_W_MIN = 1e-6

LOSS_WEIGHTINGS = ("elbo", "released", "released_conditional")

# DiffusionBERT's sampler (diffusion_word_freq.py): the epsilon inside every log, and the clip of the
# keep probability in noise_fn (alpha <= 0.999 at every t > 0)
RELEASED_EPS = 1e-20
RELEASED_KEEP_MAX = 0.999

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossOutput:
    loss: torch.Tensor        # scalar to backpropagate: bound per noised token + hybrid CE
    nelbo: torch.Tensor       # [B] unbiased single-sample estimate of each example's NELBO (nats)
    ce: torch.Tensor          # scalar, mean -log p_hat(x0) over masked positions
    num_tokens: torch.Tensor  # scalar, noised (diffused) positions in the batch
    num_masked: torch.Tensor  # scalar, positions masked at the drawn t


def _safe_w(a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """``w = (alpha_s - alpha_t) / (1 - alpha_t)``; 1 where ``alpha_t = 1`` (nothing can be masked)."""
    den = 1.0 - a_t
    return torch.where(den > 0, (a_s - a_t) / den.clamp_min(1e-300), torch.ones_like(a_t)).clamp(0.0, 1.0)


def filter_logits(logits: torch.Tensor, topk: int = 0, top_p: float = 1.0,
                  temperature: float = 1.0) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of ``[N, V]`` logits; removed entries are -inf."""
    if temperature != 1.0:
        logits = logits / temperature
    if topk and topk < logits.shape[-1]:
        kth = torch.topk(logits, topk, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep a token if the mass strictly before it is below top_p (the first one always stays)
        remove = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def categorical_float64(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact inverse-CDF draw from unnormalised ``[M, V]`` probabilities, computed in float64."""
    c = probs.double().cumsum(-1)
    r = torch.rand(c.shape[0], 1, dtype=torch.float64, device=c.device, generator=generator) * c[:, -1:]
    return torch.searchsorted(c, r, right=True).squeeze(-1).clamp_max(c.shape[-1] - 1)


class AbsorbingDiffusion:
    """The absorbing process: ``q_sample``, ``loss``, ``nelbo``, ``timesteps``, ``step``, ``sample``."""

    def __init__(self, schedule: Schedule, num_steps: int, mask_id: int, hybrid_lambda: float = 0.01):
        if num_steps < 1:
            raise ValueError(f"the number of diffusion steps T must be >= 1, got {num_steps}")
        self.schedule, self.T, self.mask_id, self.hybrid_lambda = schedule, int(num_steps), int(mask_id), hybrid_lambda

    # ------------------------------------------------------------------ forward process
    def alpha(self, t: torch.Tensor, x0: torch.Tensor, noise_mask: torch.Tensor) -> torch.Tensor:
        """``alpha_t`` for the forward process, [B, 1] or [B, L] (float64)."""
        return self.schedule.alpha(t.double() / self.T, x0, noise_mask)

    def sample_t(self, batch_size: int, device, low_discrepancy: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example t uniform on {1..T}; ``low_discrepancy`` stratifies u across the batch (MDLM)."""
        if low_discrepancy:
            u0 = torch.rand(1, device=device, generator=generator, dtype=torch.float64)
            u = (u0 + torch.arange(batch_size, device=device, dtype=torch.float64) / batch_size) % 1.0
        else:
            u = torch.rand(batch_size, device=device, generator=generator, dtype=torch.float64)
        return (u * self.T).long().clamp(0, self.T - 1) + 1

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise_mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x0)``: each noised token is [MASK] with probability ``1 - alpha_t``. [B, L]."""
        a_t = self.alpha(t, x0, noise_mask)
        u = torch.rand(x0.shape, device=x0.device, generator=generator, dtype=torch.float64)
        masked = (u >= a_t) & noise_mask
        return x0.masked_fill(masked, self.mask_id)

    # ------------------------------------------------------------------ bound
    def zero_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A float32 copy of ``[N, V]`` logits with the [MASK] logit at -inf (never predicted)."""
        logits = logits.to(torch.float32, copy=True)  # never write into the caller's tensor
        logits[:, self.mask_id] = float("-inf")
        return logits

    def log_p_hat(self, logits: torch.Tensor) -> torch.Tensor:
        """Zero masking, then log-softmax in float32. [N, V]."""
        return self.zero_mask(logits).log_softmax(-1)

    def kl(self, logp: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
           s: torch.Tensor, noise_mask: torch.Tensor) -> torch.Tensor:
        """KL(q(x_s | x_t, x0) || p(x_s | x_t)) at every masked position, [N] (same order as ``logp``).

        ``logp`` [N, V] is ``log p_hat`` at the masked positions of ``x_t``; ``t``, ``s`` are [B].
        """
        masked = (x_t == self.mask_id) & noise_mask
        b_idx = masked.nonzero()[:, 0]
        x0_m = x0[masked]
        logp_x0 = logp.gather(-1, x0_m[:, None]).squeeze(-1)
        if not self.schedule.token_dependent:
            w = _safe_w(self.alpha(s, x0, noise_mask), self.alpha(t, x0, noise_mask)).squeeze(-1)  # [B]
            return -(w[b_idx].float() * logp_x0)
        # Spindle: q uses the sentence's own statistic; p only the corpus constant (docs/algorithms.md §1.5).
        w_q = _safe_w(self.alpha(s, x0, noise_mask), self.alpha(t, x0, noise_mask))[masked]  # [N] float64
        W = self.unmask_weights(t, s).float()  # [B, V], reverse model: no x0

        w_p_x0 = W[b_idx, x0_m]
        # 1 - sum_v p_hat(v) w(v): sum the small terms, subtract in float64 (float32 1 - w cancels). One
        # [N, V] x [V, B] product instead of gathering an [N, V] copy of the rows (measured in bench.py)
        unmask_mass = (logp.exp() @ W.t()).gather(1, b_idx[:, None]).squeeze(1)
        stay = 1.0 - unmask_mass.double()
        unmask_term = torch.xlogy(w_q, w_q) - w_q * (logp_x0 + torch.log(w_p_x0))
        stay_term = torch.xlogy(1.0 - w_q, 1.0 - w_q) - torch.where(
            w_q < 1.0, (1.0 - w_q) * torch.log(stay.clamp_min(1e-30)), torch.zeros_like(w_q))
        return (unmask_term + stay_term).to(logp.dtype)

    def kl_per_example(self, denoise: Denoiser, x0, t, s, noise_mask, attention_mask,
                       generator=None):
        """Draw ``x_t``, call the denoiser at its masked positions, and return (KL [B], CE [N], masked)."""
        x_t = self.q_sample(x0, t, noise_mask, generator)
        masked = (x_t == self.mask_id) & noise_mask
        logits = denoise(x_t, t, attention_mask, masked)
        logp = self.log_p_hat(logits)
        kl_pos = self.kl(logp, x0, x_t, t, s, noise_mask)
        kl_b = torch.zeros(x0.shape[0], device=x0.device, dtype=kl_pos.dtype)
        kl_b.index_add_(0, masked.nonzero()[:, 0], kl_pos)
        ce_pos = -logp.gather(-1, x0[masked][:, None]).squeeze(-1)
        return kl_b, ce_pos, masked

    def loss(self, denoise: Denoiser, x0: torch.Tensor, noise_mask: torch.Tensor,
             attention_mask: torch.Tensor, low_discrepancy: bool = False,
             generator: torch.Generator | None = None, weighting: str = "elbo") -> LossOutput:
        """Training loss at one drawn t per example (uniform on 1..T), ``s = t - 1``.

        ``weighting``:

        * ``elbo``: ``T * KL(t -> s)`` summed per example (an unbiased NELBO estimate) over all noised
          tokens of the batch, plus ``hybrid_lambda`` times the mean ``CE(p_hat, x0)`` over the masked
          positions (D3PM's hybrid loss). The network's vocabulary projection runs at masked positions only.
        * ``released`` (DiffusionBERT's ``compute_kl_reverse_process`` with ``DDP_main.py``): the KL
          summed over the noised tokens with no factor T (at t = 1 it is the cross-entropy of the
          last step), plus ``hybrid_lambda`` times ``CE(p_hat, x0)`` summed over *all* noised
          tokens, masked or not, everything divided by the batch size. Relative to the KL term the
          hybrid term weighs about ``t`` times more than under ``elbo``; the projection runs at every
          noised position.
        * ``released_conditional`` (``diffusion_condition.py`` with ``DDP_main_conditional.py``): the same
          sums, not divided by the batch size (a gradient B times larger, which matters under value clipping).

        ``nelbo`` and ``ce`` are reported the same way under both (T * KL per example; mean CE over
        masked positions), so logs stay comparable.
        """
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {LOSS_WEIGHTINGS}")
        B = x0.shape[0]
        t = self.sample_t(B, x0.device, low_discrepancy, generator)
        x_t = self.q_sample(x0, t, noise_mask, generator)
        masked = (x_t == self.mask_id) & noise_mask
        released = weighting != "elbo"
        logp_all = self.log_p_hat(denoise(x_t, t, attention_mask, noise_mask if released else masked))
        logp = logp_all[masked[noise_mask]] if released else logp_all  # the masked rows, row-major
        kl_pos = self.kl(logp, x0, x_t, t, t - 1, noise_mask)
        kl_b = torch.zeros(B, device=x0.device, dtype=kl_pos.dtype).index_add_(0, masked.nonzero()[:, 0], kl_pos)
        ce_pos = -logp.gather(-1, x0[masked][:, None]).squeeze(-1)
        num_tokens, num_masked = noise_mask.sum(), masked.sum()
        ce = ce_pos.sum() / num_masked.clamp_min(1)
        nelbo = self.T * kl_b
        if released:
            ce_all = -logp_all.gather(-1, x0[noise_mask][:, None]).squeeze(-1)
            loss = (kl_b.sum() + self.hybrid_lambda * ce_all.sum()) / (B if weighting == "released" else 1)
        else:
            loss = nelbo.sum() / num_tokens.clamp_min(1) + self.hybrid_lambda * ce
        return LossOutput(loss, nelbo.detach(), ce.detach(), num_tokens, num_masked)

    def describe(self) -> dict:
        """What the run's metadata records about the schedule."""
        return self.schedule.describe()

    def timesteps(self, n: int) -> torch.Tensor:
        """A grid of ``n`` steps: ``n + 1`` distinct integers from T down to 0. [n + 1]."""
        if not 1 <= n <= self.T:
            raise ValueError(f"number of steps must be between 1 and T={self.T}, got {n}")
        grid = torch.linspace(self.T, 0, n + 1, dtype=torch.float64).round().long()
        return torch.unique_consecutive(grid)

    @torch.no_grad()
    def nelbo(self, denoise: Denoiser, x0: torch.Tensor, noise_mask: torch.Tensor,
              attention_mask: torch.Tensor, num_steps: int, monte_carlo: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Negative ELBO of each example on a grid of K = ``num_steps`` steps, [B] in nats.

        ``NELBO = sum_k E_q[KL(q(x_{t_{k-1}} | x_{t_k}, x0) || p(x_{t_{k-1}} | x_{t_k}))]``; the prior
        term is 0 because ``alpha_T = 0``. A coarser grid gives a looser bound, still a bound.
        ``monte_carlo`` draws one k per example and scales by K (one network call instead of K).
        """
        grid = self.timesteps(num_steps).to(x0.device)
        K = grid.numel() - 1
        B = x0.shape[0]
        total = torch.zeros(B, dtype=torch.float32, device=x0.device)
        if monte_carlo:
            k = torch.randint(0, K, (B,), device=x0.device, generator=generator)
            t, s = grid[k], grid[k + 1]
            kl_b, _, _ = self.kl_per_example(denoise, x0, t, s, noise_mask, attention_mask, generator)
            return K * kl_b
        for k in range(K):
            t, s = grid[k].expand(B), grid[k + 1].expand(B)
            kl_b, _, _ = self.kl_per_example(denoise, x0, t, s, noise_mask, attention_mask, generator)
            total += kl_b
        return total

    # ------------------------------------------------------------------ reverse process
    def unmask_weights(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Reverse-model ``w`` for every row: [B, 1] (token-independent) or [B, V] (spindle), floored
        at ``REVERSE_W_MIN``."""
        if t.numel() > 1 and bool((t == t[0]).all()) and bool((s == s[0]).all()):
            # the sampler's case: one (t, s) for the whole batch; compute one row, return a view
            return self.unmask_weights(t[:1], s[:1]).expand(t.shape[0], -1)
        a_s = self.schedule.alpha_vocab(s.double() / self.T)
        a_t = self.schedule.alpha_vocab(t.double() / self.T)
        return _safe_w(a_s, a_t).clamp_min(REVERSE_W_MIN)

    def base_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_t`` of the schedule's token-independent part, [B] float64 (the whole alpha for mutual, cosine)."""
        return self.schedule.base_alpha(t.double() / self.T).reshape(-1)

    def reverse_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """The reverse model's ``alpha_t``: [B, 1] (token-independent) or [B, V] (spindle: every candidate token)."""
        if t.numel() > 1 and bool((t == t[0]).all()):
            return self.reverse_alpha(t[:1]).expand(t.shape[0], -1)
        return self.schedule.alpha_vocab(t.double() / self.T)

    def base_unmask_weight(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``w = (alpha_s - alpha_t) / (1 - alpha_t)`` of the token-independent part, [B] float64."""
        return _safe_w(self.base_alpha(s), self.base_alpha(t))

    def step(self, p_hat: torch.Tensor, t: torch.Tensor, s: torch.Tensor, x_t: torch.Tensor,
             noise_mask: torch.Tensor, generator=None, k: int = 0) -> StepOutput:
        """One reverse step ``x_t -> x_s`` (``t``, ``s`` [B], s < t) given the model output: the (filtered)
        ``p_hat`` [N, V] at the N masked positions of ``x_t`` [B, L], row-major (probabilities, 0 at
        [MASK]; the sampler keeps probabilities so no step needs an exp over V). Never calls the network.

        A masked position becomes v with probability ``p_hat(v) w(v)`` and stays [MASK] otherwise:
        draw "unmask" with probability ``u = sum_v p_hat(v) w(v)``, then v from ``p_hat(v) w(v) / u``.
        Only the positions that unmask need a categorical draw. Positions outside ``noise_mask`` and
        unmasked ones keep their token. ``generator``: a ``torch.Generator`` or a ``diffusion.noise`` source
        (draws of step ``k``). Returns ``StepOutput(prev_sample=x_s [B, L])``.
        """
        noise = as_noise(generator, x_t.shape[0], x_t.device)
        masked = (x_t == self.mask_id) & noise_mask
        b_idx = masked.nonzero()[:, 0]
        w = self.unmask_weights(t, s)
        if w.shape[-1] == 1:
            u = w[b_idx, 0]
        elif w.stride(0) == 0:  # one row shared by the batch: a matrix-vector product, no [N, V] temporary
            u = (p_hat.float() @ w[0].float()).double()
        else:
            u = (p_hat.float() * w[b_idx].float()).sum(-1).double()
        draw = noise.uniform(k, STREAM_UNMASK, x_t.shape[1])[masked] < u
        if bool((s == 0).all()):
            draw = torch.ones_like(draw)  # alpha_0 = 1: every remaining [MASK] is revealed
        x_s = x_t.clone()
        if draw.any():
            q = p_hat[draw].double()  # only the positions that unmask need a draw
            if w.shape[-1] != 1:
                q = q * w[b_idx[draw]]
            vals = x_s[masked]
            vals[draw] = categorical_from_uniform(q, noise.uniform(k, STREAM_TOKEN, x_t.shape[1])[masked][draw])
            x_s[masked] = vals
        return StepOutput(x_s)

    # ------------------------------------------------------------------ the released sampler
    def released_keep(self, s: torch.Tensor, x0_guess: torch.Tensor, noise_mask: torch.Tensor) -> torch.Tensor:
        """The keep probability that DiffusionBERT's sampler puts in its posterior at time ``s``, [B, L] float64.

        Its ``noise_fn`` gives ``clip(alpha, 0, 0.999)``; with spindle, the token score is that of the
        *argmax* of ``p_hat`` at each position and the sentence mean is over those argmaxes
        (``x0_guess`` [B, L]), not a corpus constant. At ``s = 0`` it is 1 (``q0`` unchanged).
        """
        if self.schedule.token_dependent:
            a = self.schedule.alpha(s.double() / self.T, x0_guess, noise_mask)
        else:
            a = self.schedule.alpha(s.double() / self.T).expand(x0_guess.shape)
        a = a.clamp_max(RELEASED_KEEP_MAX)
        return torch.where((s == 0)[:, None], torch.ones_like(a), a)

    def released_logits(self, p_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                        noise_mask: torch.Tensor, x0_guess: torch.Tensor | None = None) -> torch.Tensor:
        """DiffusionBERT's sampling logits ``log p(x_s | x_t)`` at the masked positions, [N, V] float32.

        The released ``p_forward`` with ``return_logits=True``: ``log(q(x_s | p_hat) + eps) +
        log(q(x_t | x_s) + eps)``, unnormalised, [MASK] included as the outcome "stay masked":

        * ``v != [MASK]``: ``log(a_s p_hat(v) + eps) + log(r + eps)``;
        * ``[MASK]``: ``log(1 - a_s (1 - p_hat([MASK])) + eps)`` (+ ``log(1 + eps)``);

        with ``a_s`` from :meth:`released_keep` and ``r = 1 - base(t) / base(s)`` the probability of
        being masked between s and t under the schedule's token-independent part (the product of the
        one-step betas; for mutual and spindle ``(t - s) / (T - s)``). ``p_hat`` [N, V] are probabilities
        at the masked positions (ours are zero-masked). ``x0_guess`` [B, L] is needed for spindle.
        """
        masked = (x_t == self.mask_id) & noise_mask
        b_idx = masked.nonzero()[:, 0]
        if x0_guess is None:
            if self.schedule.token_dependent:
                raise ValueError("the released sampler with a token-dependent schedule needs x0_guess")
            x0_guess = x_t
        a_s = self.released_keep(s, x0_guess, noise_mask)[masked].float()[:, None]       # [N, 1]
        base_t, base_s = self.schedule.base_alpha(t.double() / self.T), self.schedule.base_alpha(s.double() / self.T)
        r = (1.0 - base_t / base_s.clamp_min(1e-300)).clamp(0.0, 1.0).squeeze(-1)[b_idx].float()[:, None]
        p = p_hat.float()
        logits = torch.log(a_s * p + RELEASED_EPS) + torch.log(r + RELEASED_EPS)
        stay = 1.0 - a_s.squeeze(-1) * (1.0 - p[:, self.mask_id])
        logits[:, self.mask_id] = torch.log(stay + RELEASED_EPS) + math.log1p(RELEASED_EPS)
        return logits

    def step_released(self, p_hat: torch.Tensor, t: torch.Tensor, s: torch.Tensor, x_t: torch.Tensor,
                      noise_mask: torch.Tensor, x0_guess: torch.Tensor | None = None, topk: int = 0,
                      top_p: float = 1.0, temperature: float = 1.0, generator=None, k: int = 0) -> StepOutput:
        """One step of DiffusionBERT's sampler, arguments as :meth:`step` (``p_hat`` [N, V] at the masked
        positions; ``x0_guess`` [B, L] for spindle): temperature, top-k and top-p act on
        :meth:`released_logits` ([MASK] a candidate like any token) and ``x_s`` is drawn from them.
        A drawn [MASK] stays masked. Unmasked positions keep their token: the released logits give
        every other value a factor ``eps = 1e-20``, which no float32 draw reaches. Returns
        ``StepOutput(prev_sample=x_s [B, L])``; never calls the network.

        At temperature 0.1 the probabilities are raised to the power 10, so a position unmasks only
        once ``a_s p_hat(v) r`` comes close to ``1 - a_s``: confidence-gated unmasking.
        """
        masked = (x_t == self.mask_id) & noise_mask
        x_s = x_t.clone()
        if masked.any():
            logits = filter_logits(self.released_logits(p_hat, x_t, t, s, noise_mask, x0_guess), topk, top_p, temperature)
            u = as_noise(generator, x_t.shape[0], x_t.device).uniform(k, STREAM_TOKEN, x_t.shape[1])[masked]
            x_s[masked] = categorical_from_uniform(logits.softmax(-1), u)
        return StepOutput(x_s)

    # ------------------------------------------------------------------ sampling loop
    def _p_hat(self, sampler: Sampler, denoise: Denoiser, x, t, attention_mask, masked, rows, filters, restrict,
               state, cache) -> tuple[torch.Tensor | None, int]:
        """``p_hat`` [N, V] at the masked positions of ``rows`` [B] (row-major) and the rows evaluated; the network
        runs on the rows that changed since the cache's step (all of them without ``cache``), the others reuse
        the cached ``p_hat``. ``cache``: a dict the loop keeps between steps (``x``, ``rows``, ``p``)."""
        need = rows & masked.any(-1)
        here = masked & need[:, None]
        if not need.any():
            return masked.new_zeros((0,)).float().reshape(0, 1), 0
        fresh_rows = need
        if cache.get("x") is not None:
            fresh_rows = need & ((x != cache["x"]).any(-1) | ~cache["rows"])
        reuse_rows = need & ~fresh_rows
        guess = state.get("x0_guess")
        fresh = None
        if fresh_rows.any():
            # the released spindle posterior scores the argmax of p_hat at every noised position
            positions = (here if guess is None else state["noise_mask"])[fresh_rows]
            logits = self.zero_mask(denoise(x[fresh_rows], t[fresh_rows], attention_mask[fresh_rows], positions))
            if restrict is not None:  # tokens a position may not take (e.g. a continuation piece at a word start)
                where, tokens = restrict
                logits = logits.masked_fill(where[fresh_rows][positions][:, None] & tokens[None], float("-inf"))
            if guess is not None:
                rows_i = fresh_rows.nonzero().squeeze(-1)
                g = guess[rows_i]
                g[positions] = logits.argmax(-1)
                guess[rows_i] = g
                logits = logits[masked[fresh_rows][positions]]  # keep the masked positions
            fresh = sampler.probabilities(logits, filters)
        p_hat = fresh
        if reuse_rows.any():
            p_hat = self._splice(fresh, fresh_rows, reuse_rows, here, cache["p"], cache["mask"])
        return p_hat, int(fresh_rows.sum())

    @staticmethod
    def _splice(fresh: torch.Tensor | None, fresh_rows: torch.Tensor, reuse_rows: torch.Tensor, masked: torch.Tensor,
                cache_p: torch.Tensor, cache_mask: torch.Tensor) -> torch.Tensor:
        """``p_hat`` [N, V] at the N ``masked`` positions [B, L] of this step, row-major: ``fresh`` for the
        rows just evaluated (``fresh_rows`` [B]), the cached ``cache_p`` (at ``cache_mask``) for the rows
        reused (``reuse_rows`` [B]); the cached tensor itself when nothing changed anywhere (no copy)."""
        if not fresh_rows.any() and torch.equal(masked, cache_mask):
            return cache_p
        p_hat = cache_p.new_empty(int(masked.sum()), cache_p.shape[-1])
        pos_fresh = fresh_rows[:, None].expand_as(masked)[masked]
        p_hat[~pos_fresh] = cache_p[(reuse_rows[:, None] & cache_mask)[cache_mask]]
        if fresh_rows.any():
            p_hat[pos_fresh] = fresh
        return p_hat

    def _redraw_all(self, denoise, x, t, attention_mask, noise_mask, filters, noise, k) -> torch.Tensor:
        """The released seq2seq sampler's last step: every noised position, masked or not, drawn from p_hat."""
        p = filter_logits(self.zero_mask(denoise(x, t, attention_mask, noise_mask)), *filters).softmax(-1)
        x = x.clone()
        x[noise_mask] = categorical_from_uniform(p, noise.uniform(k, STREAM_TOKEN, x.shape[1])[noise_mask])
        return x

    @torch.no_grad()
    def sample(self, denoise: Denoiser, x: torch.Tensor, noise_mask: torch.Tensor,
               attention_mask: torch.Tensor, steps: int, topk: int = 0, top_p: float = 1.0,
               temperature: float = 1.0, cache: bool = True, generator=None, sampler: str | Sampler = "ours",
               final_x0: bool = False, start_id: int | None = None,
               restrict: tuple[torch.Tensor, torch.Tensor] | None = None) -> SampleOutput:
        """Sampling from ``x`` [B, L] (noised positions set to [MASK]) over a grid of ``steps``.

        ``sampler``: a name of ``diffusion.samplers`` (its default options) or a :class:`Sampler`:

        * ``ours``: temperature, top-k and top-p act on ``p_hat`` (zero-masked), then :meth:`step`
          (a masked position unmasks with probability ``sum_v p_hat(v) w(v)``).
        * ``released``: DiffusionBERT's ``discrete_diffusion_predict_fn``: they act on the posterior
          logits, [MASK] included (:meth:`step_released`). ``final_x0`` adds the released seq2seq
          sampler's last step (``diffusion_condition.p_forward`` at ``t == step_size``): every noised
          position, masked or not, is redrawn from the filtered ``p_hat``.
        * ``confidence``, ``parallel``, ``remask``, ``first_hitting``: :mod:`diffusion.samplers`.

        ``cache`` (MDLM): with a time-agnostic denoiser the output depends on ``x_t`` only, so a row
        whose tokens did not change since its last evaluation reuses its ``p_hat``; the network is
        called only on rows that changed. Only valid when the denoiser ignores t.
        ``generator``: a ``torch.Generator`` (draws for the batch) or a ``diffusion.noise.SampleNoise`` (draws
        per sample: the result does not depend on the batch). ``restrict``: ``(where [B, L] bool, tokens [V]
        bool)``, tokens that the positions ``where`` never take.

        ``start_id``: the token the noised positions start from (default [MASK]). The released
        ``discrete_diffusion_predict_fn`` starts from its default ``mask_token_id=103``, BERT's [MASK], with any
        tokenizer; with RoBERTa that is an ordinary token, which the released step never changes, so only the
        ``final_x0`` redraw moves it.
        """
        if isinstance(sampler, str):
            sampler = make_sampler(sampler, final_x0=final_x0)
        elif final_x0 and not sampler.final_x0:
            raise ValueError("final_x0 belongs to the released sampler")
        sampler.check(self)
        x = x.masked_fill(noise_mask, self.mask_id if start_id is None else start_id)
        B = x.shape[0]
        noise = as_noise(generator, B, x.device)
        state = sampler.start(self, x, noise_mask)
        state.update(filters=(topk, top_p, temperature), noise_mask=noise_mask)
        if sampler.name == "released" and self.schedule.token_dependent:
            # the released spindle posterior scores the argmax of p_hat at every noised position
            state["x0_guess"] = x.clone()
        grid = self.timesteps(steps).to(x.device)
        K = grid.numel() - 1
        calls = rows_evaluated = 0
        memo: dict = {}
        for k in range(K):
            t, s = grid[k].expand(B), grid[k + 1].expand(B)
            if sampler.final_x0 and k == K - 1:
                x = self._redraw_all(denoise, x, t, attention_mask, noise_mask, state["filters"], noise, k)
                calls, rows_evaluated = calls + 1, rows_evaluated + B
                break
            masked = (x == self.mask_id) & noise_mask
            if not sampler.active(masked, noise_mask, s).any():
                if sampler.final_x0:
                    continue  # nothing changes before the final redraw
                break
            rows = sampler.rows(self, masked, t, s, k, noise, state)
            p_hat, fresh = self._p_hat(sampler, denoise, x, t, attention_mask, masked, rows, state["filters"],
                                       restrict, state, memo)
            calls, rows_evaluated = calls + (fresh > 0), rows_evaluated + fresh
            x_new = sampler.step(self, p_hat, t, s, x, noise_mask, k, noise, state).prev_sample
            if cache:
                memo.update(x=x, rows=rows & masked.any(-1), p=p_hat, mask=masked & (rows & masked.any(-1))[:, None])
            x = x_new
        return SampleOutput(x, calls, rows_evaluated)
