"""Noise schedules for absorbing-state (masking) diffusion.

A schedule gives ``alpha_t``: the probability that a clean token is still unmasked at step t.
Time is passed as ``s = t / T`` in [0, 1], with ``alpha(0) = 1`` and ``alpha(1) = 0``.

Two kinds:

* token-independent (``mutual``, ``cosine``, ``loglinear``): ``alpha`` is one number per example, returned
  with shape ``[B, 1]`` so that it broadcasts over positions. They also give ``dalpha`` (the derivative in s)
  and ``end_jump`` (``alpha(1-)``, the mass that the last instant masks at once), which the continuous-time
  objective of ``diffusion/mdlm.py`` needs.
* token-dependent (``spindle``, DiffusionBERT Eq. 10-12): ``alpha`` depends on how informative the
  clean token is, so the forward process needs ``x0`` and returns ``[B, L]``. The *reverse* model
  must not see ``x0``; it uses :meth:`Schedule.alpha_vocab`, which gives ``alpha`` for every
  candidate token ``v`` with the sentence statistic replaced by a corpus constant (``[B, V]``).

Schedules are registered by name in :data:`SCHEDULES`; build one with :func:`make_schedule`.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("mutual", "cosine", "spindle", "loglinear")
SPINDLE_FORMS = ("released", "paper")


class Schedule:
    """Base class. Subclasses implement :meth:`alpha` and, if token-dependent, :meth:`alpha_vocab`."""

    token_dependent = False
    name = "base"
    end_jump = 0.0  # alpha(1-) - alpha(1): a jump to all-[MASK] at s = 1 (docs/algorithms.md §1.14)

    def alpha(self, s: torch.Tensor, x0: torch.Tensor | None = None,
              noise_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``alpha`` at times ``s`` ([B], float in [0, 1]). Returns [B, 1] or, if token-dependent, [B, L]."""
        raise NotImplementedError

    def dalpha(self, s: torch.Tensor) -> torch.Tensor:
        """``d alpha / ds`` at ``s`` ([B], in [0, 1)) of a token-independent schedule, [B] float64."""
        raise ValueError(f"the {self.name} schedule has no token-independent derivative")

    def alpha_vocab(self, s: torch.Tensor) -> torch.Tensor:
        """``alpha`` for the reverse model: [B, 1], or [B, V] for every candidate token."""
        return self.alpha(s)

    def base_alpha(self, s: torch.Tensor) -> torch.Tensor:
        """The token-independent part of ``alpha``, [B, 1]: the cumulative product of the one-step keep
        probabilities ``1 - beta`` that DiffusionBERT's released code multiplies into its posteriors."""
        return self.alpha(s)

    def describe(self) -> dict:
        return {"name": self.name}


class Mutual(Schedule):
    """D3PM's schedule for the absorbing state: ``beta_t = 1/(T - t + 1)``, i.e. ``alpha_t = 1 - t/T``."""

    name = "mutual"

    def alpha(self, s, x0=None, noise_mask=None):
        return (1.0 - s.double()).clamp(0.0, 1.0).unsqueeze(-1)

    def dalpha(self, s):
        return torch.full_like(s, -1.0, dtype=torch.float64)


class Cosine(Schedule):
    """``alpha_t = cos(pi/2 * t/T)``: slow masking at first, fast at the end."""

    name = "cosine"

    def alpha(self, s, x0=None, noise_mask=None):
        a = torch.cos(0.5 * math.pi * s.double())
        a = torch.where(s >= 1, torch.zeros_like(a), a)  # cos(pi/2) is 6e-17, not 0
        return a.clamp(0.0, 1.0).unsqueeze(-1)

    def dalpha(self, s):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * s.double())


class LogLinear(Schedule):
    """MDLM's log-linear schedule (Sahoo et al. 2024, ``noise_schedule.LogLinearNoise``): total noise
    ``sigma(s) = -log(1 - (1 - eps) s)``, so ``alpha = exp(-sigma) = 1 - (1 - eps) s`` and the
    continuous-time weight ``-alpha' / (1 - alpha) = 1/s``. ``eps = 1e-3`` as released.

    MDLM's ``alpha(1) = eps``; its sampler starts from all-[MASK] anyway and its bound has no prior term.
    Here ``alpha(1) = 0`` exactly, so that the all-[MASK] start is the model's prior: the schedule jumps
    from ``eps`` to 0 at ``s = 1`` (``end_jump``), a last discrete step whose KL the bound adds exactly."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"the log-linear eps must be in [0, 1), got {eps}")
        self.eps = self.end_jump = float(eps)

    def alpha(self, s, x0=None, noise_mask=None):
        s = s.double()
        a = 1.0 - (1.0 - self.eps) * s
        return torch.where(s >= 1, torch.zeros_like(a), a).clamp(0.0, 1.0).unsqueeze(-1)

    def dalpha(self, s):
        return torch.full_like(s, -(1.0 - self.eps), dtype=torch.float64)

    def describe(self):
        return {"name": self.name, "eps": self.eps}


class Spindle(Schedule):
    """DiffusionBERT's spindle schedule: rare tokens are masked first, frequent ones last.

    ``alpha_t^i = clip(1 - s + lam * sin(pi s) * d_i, 0, 1)`` with a per-token score ``d_i``:

    * ``released`` (default, the released code): ``d_i = f(x0^i) - fbar``, where
      ``f(v) = log(1 + count_v) / max_u log(1 + count_u)`` and ``fbar`` is the mean of f over the
      sentence's noised tokens.
    * ``paper`` (Eq. 10-12): ``alpha = 1 - s - S(s) * Htilde(x0^i)``, ``S = lam sin(pi s)``,
      ``Htilde_i = 1 - Hbar / H_i`` with ``H_v = -log p_v`` the information content, i.e.
      ``d_i = Hbar / H_i - 1``.

    The reverse model replaces the sentence statistic (``fbar`` or ``Hbar``) by its corpus mean
    (token-weighted), so ``p(x_s | x_t)`` depends on ``x_t`` only.

    Monotonicity: ``g(s) = 1 - s + c sin(pi s)`` is concave for c > 0 and convex for c < 0, with
    ``g(0) = 1`` and ``g(1) = 0``, so clipping to [0, 1] always gives an ``alpha`` that is
    non-increasing in s, for any ``lam``. For ``lam * pi * max|d| <= 1`` the clip is never active.
    """

    name = "spindle"
    token_dependent = True

    def __init__(self, counts: torch.Tensor, lam: float = 0.3, form: str = "released",
                 pad_id: int | None = None):
        if form not in SPINDLE_FORMS:
            raise ValueError(f"unknown spindle form {form!r}; choose one of {SPINDLE_FORMS}")
        counts = torch.as_tensor(counts, dtype=torch.float64).clone()
        if pad_id is not None:
            counts[pad_id] = 0.0
        if counts.sum() <= 0:
            raise ValueError("spindle schedule needs word frequencies with a positive total")
        self.lam, self.form, self.counts = float(lam), form, counts
        p = counts / counts.sum()
        if form == "released":
            logc = torch.log1p(counts)
            self.score = logc / logc.max()  # f(v), f(PAD) = 0
        else:
            # Unseen tokens get the information content of a count of 1/2 (add-half smoothing).
            p_smooth = (counts + 0.5) / (counts.sum() + 0.5 * counts.numel())
            self.score = -torch.log(p_smooth)  # H(v)
        self.corpus_mean = float((p * self.score).sum())

    def _d(self, score: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return score - mean if self.form == "released" else mean / score - 1.0

    def _g(self, s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        s = s.double().unsqueeze(-1)
        a = 1.0 - s + self.lam * torch.sin(math.pi * s) * d
        a = torch.where(s >= 1, torch.zeros_like(a), a)  # sin(pi) is 1e-16, not 0
        return a.clamp(0.0, 1.0)

    def token_scores(self, x0: torch.Tensor, noise_mask: torch.Tensor) -> torch.Tensor:
        """Per-token ``d_i`` [B, L] from the sentence's own statistic (forward process only)."""
        score = self.score.to(x0.device)[x0]
        m = noise_mask.double()
        mean = (score * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)
        return self._d(score, mean)

    def alpha(self, s, x0=None, noise_mask=None):
        if x0 is None:
            raise ValueError("the spindle schedule's forward process needs x0")
        if noise_mask is None:
            noise_mask = torch.ones_like(x0, dtype=torch.bool)
        return self._g(s, self.token_scores(x0, noise_mask))

    def base_alpha(self, s):
        """The released code runs spindle on the mutual schedule's betas: ``1 - s``."""
        return (1.0 - s.double()).clamp(0.0, 1.0).unsqueeze(-1)

    def alpha_vocab(self, s):
        score = self.score.to(s.device)
        return self._g(s, self._d(score, torch.tensor(self.corpus_mean, dtype=torch.float64)))

    def describe(self):
        return {"name": self.name, "lambda": self.lam, "form": self.form,
                "corpus_mean": self.corpus_mean}


def make_schedule(name: str, counts: torch.Tensor | None = None, lam: float = 0.3,
                  form: str = "released", pad_id: int | None = None) -> Schedule:
    """Build a schedule by name. ``spindle`` needs the token counts from ``word_freq.py``."""
    if name == "mutual":
        return Mutual()
    if name == "cosine":
        return Cosine()
    if name == "loglinear":
        return LogLinear()
    if name == "spindle":
        if counts is None:
            raise ValueError("the spindle schedule needs word frequencies (run word_freq.py)")
        return Spindle(counts, lam=lam, form=form, pad_id=pad_id)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
