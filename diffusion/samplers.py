"""Decoding rules of the absorbing process, one class each, registered by name (docs/algorithms.md §4).

The loop (:meth:`AbsorbingDiffusion.sample`) is shared: at each step (t, s) of the grid it asks the sampler
which rows need the model's ``p_hat`` (:meth:`Sampler.rows`), calls the network there, and hands ``p_hat``
[N, V] (at the masked positions of those rows, row-major) to :meth:`Sampler.step`, which returns ``x_s`` and
never calls the network. A sampler's random draws come from the loop's noise source
(:mod:`diffusion.noise`), one stream per kind of draw, indexed by step and canvas position.

* ``ours``: the exact reverse step of the process (ancestral; D3PM, MDLM).
* ``released``: DiffusionBERT's sampler (posterior logits with [MASK] a candidate).
* ``confidence``: unmask the most confident positions, as many as the schedule expects (MaskGIT, LLaDA's
  ``low_confidence``, Dream's ``topk_margin`` and ``entropy`` orders).
* ``parallel``: unmask every position whose confidence reaches a threshold, at least one (Fast-dLLM).
* ``remask``: ReMDM: decoded tokens go back to [MASK] with probability sigma_t (``cap``, ``rescale``, ``conf``).
* ``first_hitting``: the exact reverse chain, drawing first which rows change at a step, so the network is
  called only for them (MDLM's cached sampler, first-hitting in the sense of Zheng et al. 2024).
"""
from __future__ import annotations

import math

import torch

from .noise import STREAM_COUNT, STREAM_EVENT, STREAM_ORDER, STREAM_REMASK, STREAM_TOKEN, STREAM_UNMASK
from .outputs import StepOutput

ORDERS = ("confidence", "margin", "entropy")
REMASK_SCHEDULES = ("cap", "rescale", "conf")
DEFAULT_THRESHOLD = 0.9       # Fast-dLLM's threshold
DEFAULT_ETA = {"cap": 0.008, "rescale": 0.015}  # the released remdm-cap.sh / remdm-rescale.sh


def categorical_from_uniform(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from unnormalised ``[M, V]`` probabilities with the given uniforms ``u`` [M], in float64."""
    c = probs.double().cumsum(-1)
    r = u.double()[:, None] * c[:, -1:]
    return torch.searchsorted(c, r, right=True).squeeze(-1).clamp_max(c.shape[-1] - 1)


def top_by_row(score: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: in each row the ``count[b]`` positions of highest ``score`` [B, L] (-inf: never chosen), ties
    to the leftmost position (a stable sort), so the choice is a function of the row alone."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return (rank < count[:, None]) & (score > -math.inf)


def confidence_score(p_hat: torch.Tensor, x0: torch.Tensor, order: str) -> torch.Tensor:
    """How sure the model is at each position, [N] float64, higher first (Dream's ``sample_tokens``):
    ``confidence`` p_hat(x0) of the drawn token (MaskGIT, LLaDA ``low_confidence``); ``margin`` top-1 minus
    top-2 probability; ``entropy`` the negative entropy ``sum_v p log p``."""
    p = p_hat.double()
    if order == "confidence":
        return p.gather(-1, x0[:, None]).squeeze(-1)
    if order == "margin":
        top = p.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    return torch.xlogy(p, p).sum(-1)


def scatter_rows(values: torch.Tensor, where: torch.Tensor, fill) -> torch.Tensor:
    """[B, L] tensor holding ``values`` [N] at the N True positions of ``where`` [B, L], ``fill`` elsewhere."""
    out = torch.full(where.shape, fill, dtype=values.dtype, device=values.device)
    out[where] = values
    return out


class Sampler:
    """A decoding rule. Subclasses set ``name`` and implement :meth:`step`."""

    name = ""
    final_x0 = False                # redraw every noised position from p_hat at the last step (released seq2seq)

    def check(self, diffusion) -> None:
        """ValueError if the sampler cannot run on this process (none today: every rule takes every schedule)."""

    def start(self, diffusion, x: torch.Tensor, noise_mask: torch.Tensor) -> dict:
        """The sampler's state for one ``sample`` call."""
        return {}

    def probabilities(self, logits: torch.Tensor, filters) -> torch.Tensor:
        """``p_hat`` [N, V] from zero-masked logits: temperature, top-k and top-p act on them, then a softmax."""
        from .absorbing import filter_logits
        return filter_logits(logits, *filters).softmax(-1)

    def active(self, masked: torch.Tensor, noise_mask: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """[B] bool: rows that may still change."""
        return masked.any(-1)

    def rows(self, diffusion, masked, t, s, k, noise, state) -> torch.Tensor:
        """[B] bool: the rows whose ``p_hat`` this step needs (default: the active ones)."""
        return masked.any(-1)

    def step(self, diffusion, p_hat, t, s, x, noise_mask, k, noise, state) -> StepOutput:
        raise NotImplementedError


class Ancestral(Sampler):
    """The exact reverse step (:meth:`AbsorbingDiffusion.step`)."""
    name = "ours"

    def step(self, diffusion, p_hat, t, s, x, noise_mask, k, noise, state):
        return diffusion.step(p_hat, t, s, x, noise_mask, noise, k=k)


class Released(Sampler):
    """DiffusionBERT's sampler (:meth:`AbsorbingDiffusion.step_released`); the filters act on its posterior."""
    name = "released"

    def __init__(self, final_x0: bool = False):
        self.final_x0 = final_x0

    def probabilities(self, logits, filters):
        return logits.softmax(-1)

    def step(self, diffusion, p_hat, t, s, x, noise_mask, k, noise, state):
        return diffusion.step_released(p_hat, t, s, x, noise_mask, state.get("x0_guess"), *state["filters"],
                                       generator=noise, k=k)


def unmask_count(diffusion, t: torch.Tensor, s: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """[B] long: how many masked positions a step t -> s unmasks, Dream's rule ``int(m (1 - s/t))`` with the
    schedule's ``w = (alpha_s - alpha_t) / (1 - alpha_t)`` in place of ``1 - s/t`` (equal for the linear
    schedule); every remaining one at s = 0. ``m``: the row's masked positions."""
    m = masked.sum(-1)
    w = diffusion.base_unmask_weight(t, s)
    k = torch.floor(m.double() * w + 1e-9).long()  # 1e-9: m w = 3 must not become 2.9999999
    return torch.where(s == 0, m, k.clamp(max=m))


class Confidence(Sampler):
    """Draw x0 at every masked position from p_hat, then keep the ``unmask_count`` most confident ones (ties to
    the leftmost). ``order``: :func:`confidence_score`. ``--topk 1`` gives LLaDA/Dream's greedy (temperature 0)."""
    name = "confidence"

    def __init__(self, order: str = "confidence"):
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
        self.order = order

    def choose(self, diffusion, score, t, s, masked) -> torch.Tensor:
        return top_by_row(score, unmask_count(diffusion, t, s, masked))

    def step(self, diffusion, p_hat, t, s, x, noise_mask, k, noise, state):
        masked = (x == diffusion.mask_id) & noise_mask
        x0 = categorical_from_uniform(p_hat, noise.uniform(k, STREAM_TOKEN, x.shape[1])[masked])
        score = scatter_rows(confidence_score(p_hat, x0, self.order), masked, -math.inf)
        chosen = self.choose(diffusion, score, t, s, masked)
        x_s = x.clone()
        x_s[chosen] = scatter_rows(x0, masked, 0)[chosen]
        return StepOutput(x_s)


class Parallel(Confidence):
    """Fast-dLLM's threshold rule: unmask every masked position whose p_hat(x0) reaches ``threshold``, and the
    row's most confident one in any case; every remaining one at s = 0."""
    name = "parallel"

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"the threshold must be in (0, 1], got {threshold}")
        super().__init__("confidence")
        self.threshold = float(threshold)

    def choose(self, diffusion, score, t, s, masked):
        first = top_by_row(score, torch.ones_like(s))
        return first | (score >= self.threshold) | (masked & (s == 0)[:, None])


class Remask(Sampler):
    """ReMDM (Wang et al. 2025, Eq. 4): a decoded token goes back to [MASK] with probability ``sigma_t``; a masked
    position becomes v with probability ``p_hat(v) (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t)``.

    ``sigma_max = min(1, (1 - alpha_s) / alpha_t)`` (1 where alpha_t = 0) keeps both probabilities valid;
    ``cap``: ``sigma = min(eta, sigma_max)``; ``rescale``: ``sigma = eta sigma_max``; ``conf``: ``sigma = eta_i
    sigma_max`` with ``eta_i`` the softmax over the row's decoded positions of ``-p_hat(x_i)`` when x_i was
    decoded (less confident tokens are remasked more), 0 at masked and fixed positions. With a token-dependent
    schedule (spindle) alpha is the reverse model's ``alpha(v)`` of the token in question (of the decoded token
    for the remasking, of each candidate v for the unmasking): the same formulas token by token.
    """
    name = "remask"

    def __init__(self, schedule: str = "cap", eta: float | None = None):
        if schedule not in REMASK_SCHEDULES:
            raise ValueError(f"unknown remask schedule {schedule!r}; choose one of {REMASK_SCHEDULES}")
        if schedule == "conf":
            if eta is not None:
                raise ValueError("the conf remask schedule has no eta (its eta is the softmax of the confidences)")
        else:
            eta = DEFAULT_ETA[schedule] if eta is None else float(eta)
            if not 0.0 <= eta <= 1.0:
                raise ValueError(f"the remask eta must be in [0, 1] (sigma_t is a probability), got {eta}")
        self.schedule, self.eta = schedule, eta

    def start(self, diffusion, x, noise_mask):
        return {"conf": torch.full(x.shape, -math.inf, dtype=torch.float64, device=x.device)}

    def active(self, masked, noise_mask, s):
        return masked.any(-1) | (noise_mask.any(-1) & (s > 0))

    @staticmethod
    def sigma_max(a_t: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
        """``min(1, (1 - alpha_s) / alpha_t)``, 1 where alpha_t = 0 (any shape)."""
        return torch.where(a_t > 0, ((1 - a_s) / a_t.clamp_min(1e-300)).clamp(0.0, 1.0), torch.ones_like(a_t))

    def sigma(self, a_t: torch.Tensor, a_s: torch.Tensor, eta_conf: torch.Tensor | None = None) -> torch.Tensor:
        """``sigma_t`` for ``alpha_t``, ``alpha_s`` (any shape); ``eta_conf``: conf's per-position eta."""
        top = self.sigma_max(a_t, a_s)
        if self.schedule == "cap":
            return top.clamp(max=self.eta)
        return top * (self.eta if self.schedule == "rescale" else eta_conf)

    def step(self, diffusion, p_hat, t, s, x, noise_mask, k, noise, state):
        masked = (x == diffusion.mask_id) & noise_mask
        decoded = noise_mask & ~masked
        A_t, A_s = diffusion.reverse_alpha(t), diffusion.reverse_alpha(s)       # [B, 1] or [B, V]
        L = x.shape[1]
        # remasking: alpha of each decoded token
        col = x.clamp(max=A_t.shape[-1] - 1) if A_t.shape[-1] > 1 else torch.zeros_like(x)
        a_t, a_s = A_t.gather(1, col), A_s.gather(1, col)                       # [B, L]
        eta_conf = None
        if self.schedule == "conf":
            score = state["conf"].masked_fill(~decoded, -math.inf)
            eta_conf = score.softmax(-1).nan_to_num(0.0)
        sigma = torch.where(decoded, self.sigma(a_t, a_s, eta_conf), torch.zeros_like(a_t))
        remask = decoded & (noise.uniform(k, STREAM_REMASK, L) < sigma)
        # unmasking: p_hat(v) (w(v) + sigma(v) alpha_t(v) / (1 - alpha_t(v))), sigma = 0 at a masked position for conf
        b_idx = masked.nonzero()[:, 0]
        w = diffusion.unmask_weights(t, s)[b_idx].double()                      # [N, 1] or [N, V]
        if self.schedule != "conf":
            at, as_ = A_t[b_idx], A_s[b_idx]
            w = w + self.sigma(at, as_) * at / (1 - at).clamp_min(1e-300)
        q = p_hat.double() * w                                                  # [N, V]
        u = q.sum(-1)
        unmask = noise.uniform(k, STREAM_UNMASK, L)[masked] < u
        if bool((s == 0).all()):
            unmask = torch.ones_like(unmask)  # alpha_0 = 1: every remaining [MASK] is revealed
        x0 = categorical_from_uniform(q, noise.uniform(k, STREAM_TOKEN, L)[masked])
        unmask_bl = scatter_rows(unmask, masked, False)
        x_s = x.clone()
        x_s[unmask_bl] = scatter_rows(x0, masked, 0)[unmask_bl]
        x_s[remask] = diffusion.mask_id
        conf = state["conf"]
        conf[unmask_bl] = -scatter_rows(p_hat.double().gather(-1, x0[:, None]).squeeze(-1), masked, 0.0)[unmask_bl]
        conf[remask] = -math.inf
        return StepOutput(x_s)


def conditional_binomial(n: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[R] long: a draw of ``m ~ Binomial(n, w)`` given ``m >= 1`` by the inverse CDF of ``u`` [R] (``n`` [R] >= 1,
    ``w`` [R] in (0, 1]), in float64."""
    m = torch.arange(1, int(n.max()) + 1, device=n.device, dtype=torch.float64)[None]   # [1, M]
    nn, ww = n.double()[:, None], w.double()[:, None]
    logc = torch.lgamma(nn + 1) - torch.lgamma(m + 1) - torch.lgamma((nn - m).clamp_min(0) + 1)
    logp = logc + torch.xlogy(m, ww) + torch.xlogy(nn - m, 1 - ww)
    p = torch.where(m <= nn, logp.exp(), torch.zeros_like(logp))
    return categorical_from_uniform(p, u) + 1


class FirstHitting(Sampler):
    """The exact reverse chain on the grid, deciding before the network call which rows may change.

    A masked position unmasks at t -> s with probability ``u = sum_v p_hat(v) w(v) <= w_max = max_v w(v)``, which
    does not need p_hat (``u = w`` for a token-independent schedule). So draw first, from ``w_max`` alone, the
    candidates: a row with n masked positions has one with probability ``1 - (1 - w_max)^n``, and only such rows
    are evaluated; it then has ``m ~ Binomial(n, w_max) | m >= 1`` candidates, chosen uniformly, each of which
    unmasks with probability ``u / w_max`` (1 when token-independent; thinning) to v drawn from ``p_hat(v) w(v)``.
    The law of the chain is the ancestral one, with any denoiser (time-conditioned too), and a row costs at most
    one evaluation per step at which it may change (at most one per token with a token-independent schedule).
    """
    name = "first_hitting"

    def rows(self, diffusion, masked, t, s, k, noise, state):
        n = masked.sum(-1)
        w_max = diffusion.unmask_weights(t, s).amax(-1).double()
        stay = (1 - w_max).clamp(0.0, 1.0) ** n.double()      # no candidate in the row
        changes = (n > 0) & (noise.uniform(k, STREAM_EVENT, 1)[:, 0] >= stay)
        state["changes"], state["w_max"] = changes, w_max
        return changes

    def step(self, diffusion, p_hat, t, s, x, noise_mask, k, noise, state):
        changes, w_max = state["changes"], state["w_max"]
        masked = (x == diffusion.mask_id) & noise_mask
        x_s = x.clone()
        if not changes.any():
            return StepOutput(x_s)
        L = x.shape[1]
        n = masked.sum(-1)
        m = torch.zeros_like(n)
        u = noise.uniform(k, STREAM_COUNT, 1)[:, 0]
        m[changes] = conditional_binomial(n[changes], w_max[changes], u[changes])
        keys = noise.uniform(k, STREAM_ORDER, L).masked_fill(~masked, math.inf)
        candidate = top_by_row(-keys, m) & changes[:, None]   # m positions uniformly at random
        here = masked & changes[:, None]                      # where p_hat was given
        b_idx = here.nonzero()[:, 0]
        q = p_hat.double() * diffusion.unmask_weights(t, s)[b_idx].double()   # [N, V]: p_hat(v) w(v)
        accept = noise.uniform(k, STREAM_UNMASK, L)[here] * w_max[b_idx] < q.sum(-1)
        x0 = categorical_from_uniform(q, noise.uniform(k, STREAM_TOKEN, L)[here])
        chosen = candidate & scatter_rows(accept, here, False)
        x_s[chosen] = scatter_rows(x0, here, 0)[chosen]
        return StepOutput(x_s)


SAMPLER_CLASSES = {c.name: c for c in (Ancestral, Released, Confidence, Parallel, Remask, FirstHitting)}
SAMPLERS = tuple(SAMPLER_CLASSES)


def make_sampler(name: str, order: str | None = None, threshold: float | None = None, remask: str | None = None,
                 eta: float | None = None, final_x0: bool = False, names: dict | None = None) -> Sampler:
    """The sampler ``name`` with its options; ValueError (one line) for an unknown name, an option it does not
    take, or a value out of range. ``names``: how the messages name the options (e.g. the scripts' flags)."""
    say = {k: k for k in ("sampler", "order", "threshold", "remask", "eta")} | (names or {})
    if name not in SAMPLER_CLASSES:
        raise ValueError(f"unknown {say['sampler']} {name!r}; choose one of {', '.join(SAMPLERS)}")
    given = {"order": order, "threshold": threshold, "remask": remask, "eta": eta}
    takes = {"confidence": ("order",), "parallel": ("threshold",), "remask": ("remask", "eta")}.get(name, ())
    extra = [say[k] for k, v in given.items() if v is not None and k not in takes]
    if extra:
        also = f" (it takes {', '.join(say[k] for k in takes)})" if takes else ""
        raise ValueError(f"the {name} sampler does not take {', '.join(extra)}{also}")
    if final_x0 and name != "released":
        raise ValueError("final_x0 belongs to the released sampler")
    if order is not None and order not in ORDERS:
        raise ValueError(f"{say['order']} must be one of {', '.join(ORDERS)}, got {order!r}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"{say['threshold']} must be in (0, 1], got {threshold}")
    if remask is not None and remask not in REMASK_SCHEDULES:
        raise ValueError(f"{say['remask']} must be one of {', '.join(REMASK_SCHEDULES)}, got {remask!r}")
    if eta is not None and (remask == "conf" or not 0.0 <= eta <= 1.0):
        raise ValueError(f"{say['remask']} conf takes no {say['eta']} (its eta is a softmax of the confidences)"
                         if remask == "conf" else
                         f"{say['eta']} must be in [0, 1] (sigma_t = min(eta, sigma_max) or eta sigma_max is a "
                         f"probability), got {eta}")
    if name == "confidence":
        return Confidence(order or "confidence")
    if name == "parallel":
        return Parallel(DEFAULT_THRESHOLD if threshold is None else threshold)
    if name == "remask":
        return Remask(remask or "cap", eta)
    if name == "released":
        return Released(final_x0)
    return SAMPLER_CLASSES[name]()
