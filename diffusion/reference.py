"""A deliberately naive reference for absorbing-state diffusion, built from explicit matrices.

This is the test oracle for :mod:`diffusion.absorbing` (and what ``bench.py --reference``
times). It follows D3PM / DiffusionBERT literally instead of using the closed forms:

* states are the V vocabulary ids; [MASK] is one of them (``mask_id``), as in BERT;
* the one-step matrix ``Q_{s->t}`` ([V, V], row = from, column = to): token i stays i with
  probability ``alpha_t(i) / alpha_s(i)`` and otherwise becomes [MASK]; [MASK] stays [MASK];
* the cumulative matrix ``Qbar_t`` from x0: stay with probability ``alpha_t(x0)``, else [MASK];
  ``Qbar_s @ Q_{s->t} = Qbar_t`` (Chapman-Kolmogorov) holds for any non-increasing schedule;
* the posterior (D3PM Eq. 3) ``q(x_s | x_t, x0) ∝ Q_{s->t}[x_s, x_t] * Qbar_s[x0, x_s]``;
* the reverse model (x0-parameterisation, D3PM Eq. 4)
  ``p(x_s | x_t) = sum_{x0'} q_rev(x_s | x_t, x0') p_hat(x0' | x_t)``, with zero masking
  (``p_hat([MASK]) = 0``);
* the per-position ``KL(q(x_s | x_t, x0) || p(x_s | x_t))`` summed over V.

Schedules. The forward process uses ``schedule.alpha(t/T, x0, noise_mask)``: with a
token-dependent (spindle) schedule this depends on x0 and on the sentence statistic, so every
position gets its own matrices. Only the rows ``x0`` and [MASK] of those matrices are ever reached
from x0, so the other rows reuse the position's alpha (as DiffusionBERT's code does). The reverse
model must not see x0: it uses ``schedule.alpha_vocab(t/T)``, an alpha for every candidate token
``x0'`` with the sentence statistic replaced by a corpus constant, i.e. one [V, V] matrix pair per
example.

Undefined posteriors. ``q(x_s | x_t, x0')`` is 0/0 when ``x_t`` cannot be reached from ``x0'``.
The absorbing structure leaves one answer in each case, and it is used:

* ``x_t`` is a visible token u: only u leads to u (column u of ``Q_{s->t}`` is zero off row u), so
  ``x_s = u`` (carry-over);
* ``x_t`` is [MASK] but ``alpha_t(x0') = 1``: then ``alpha_s(x0') = 1`` too, so ``x_s = x0'``
  (the reverse model reveals x0', i.e. ``w(x0') = 1``).

Everything is float64. Every matrix entry is evaluated from the definition above; only the
entries that are used are built (row x0 of ``Qbar_s``, column x_t of ``Q_{s->t}``). The reverse
model builds one posterior matrix [x0', x_s] per distinct (t, s, x_t) and applies it to ``p_hat``
as a matmul (D3PM style): O(N V^2) time for N masked positions, memory bounded by
``max_elements`` (blocks of rows), so any vocabulary size works, slowly.
"""
from __future__ import annotations

import torch

from .schedules import Schedule
from .absorbing import REVERSE_W_MIN

DEFAULT_MAX_ELEMENTS = 1 << 24  # float64 elements per temporary block (128 MiB)


# ---------------------------------------------------------------------------- explicit matrices
def _absorbing_entries(stay: torch.Tensor, mask_id: int, rows: torch.Tensor | None = None,
                       cols: torch.Tensor | None = None) -> torch.Tensor:
    """Entries ``M[rows, cols]`` of "i -> i with probability stay(i), else -> [MASK]; [MASK] absorbing".

    ``stay`` [..., V]; ``rows`` [..., R] and ``cols`` [..., C] (default: all V). Returns [..., R, C];
    with the defaults this is the whole [V, V] matrix. Every entry comes from the definition.
    """
    V = stay.shape[-1]
    batch = stay.shape[:-1]
    full = torch.arange(V, device=stay.device)
    rows = (full if rows is None else rows).expand(*batch, -1)
    cols = (full if cols is None else cols).expand(*batch, -1)
    p = stay.gather(-1, rows).unsqueeze(-1)       # [..., R, 1]
    r, c = rows.unsqueeze(-1), cols.unsqueeze(-2)  # [..., R, 1], [..., 1, C]
    same, to_mask = (r == c).double(), (c == mask_id).double()
    M = p * same + (1.0 - p) * to_mask
    return torch.where(r == mask_id, to_mask, M)  # [MASK] stays [MASK] with probability 1


def one_step_matrix(alpha_s: torch.Tensor, alpha_t: torch.Tensor, mask_id: int,
                    rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
    """``Q_{s->t}`` [..., R, C] from alphas per from-token [..., V]: i stays i w.p. ``alpha_t(i) / alpha_s(i)``.

    Raises if the schedule increases from s to t (the ratio would not be a probability).
    """
    alpha_s, alpha_t = alpha_s.double(), alpha_t.double()
    if bool((alpha_t > alpha_s * (1 + 1e-12) + 1e-15).any()):
        raise ValueError("alpha increases from s to t: Q_{s->t} would not be a stochastic matrix")
    # a token that is surely masked at s is never in a reachable row of Q_{s->t}; any value would do
    stay = torch.where(alpha_s > 0, alpha_t / alpha_s.clamp_min(1e-300), torch.zeros_like(alpha_s))
    return _absorbing_entries(stay.clamp(0.0, 1.0), mask_id, rows, cols)


def cumulative_matrix(alpha_t: torch.Tensor, mask_id: int, rows: torch.Tensor | None = None,
                      cols: torch.Tensor | None = None) -> torch.Tensor:
    """``Qbar_t`` [..., R, C] from alphas per clean token [..., V]: stay w.p. ``alpha_t``, else [MASK]."""
    return _absorbing_entries(alpha_t.double(), mask_id, rows, cols)


# ---------------------------------------------------------------------------- alphas per position
def forward_alpha_rows(schedule: Schedule, t: torch.Tensor, T: int, x0: torch.Tensor,
                       noise_mask: torch.Tensor, V: int) -> torch.Tensor:
    """Forward-process alpha for every from-token at every position, [B, L, V] (float64, a view).

    ``schedule.alpha`` gives the alpha of the clean token at each position ([B, 1] or [B, L]); the
    rows other than x0 and [MASK] are unreachable from x0, so they share it.
    """
    a = schedule.alpha(t.double() / T, x0, noise_mask).double()
    return a.expand(x0.shape).unsqueeze(-1).expand(*x0.shape, V)


def reverse_alpha_rows(schedule: Schedule, t: torch.Tensor, T: int, V: int) -> torch.Tensor:
    """Reverse-model alpha for every candidate clean token, [B, V] (float64): no x0, no sentence."""
    a = schedule.alpha_vocab(t.double() / T).double()
    return a.expand(t.shape[0], V)


def floored_reverse_alphas(schedule: Schedule, t: torch.Tensor, s: torch.Tensor, T: int, V: int,
                           w_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse-model (alpha_s, alpha_t) rows [B, V], with alpha_s raised where needed so that the
    unmask probability ``w = (alpha_s - alpha_t) / (1 - alpha_t)`` is at least ``w_min`` (the fast
    code's ``REVERSE_W_MIN``; 0 gives the unfloored model)."""
    a_s, a_t = reverse_alpha_rows(schedule, s, T, V), reverse_alpha_rows(schedule, t, T, V)
    if w_min > 0:
        a_s = torch.where(a_t < 1, torch.maximum(a_s, a_t + w_min * (1 - a_t)), a_s)
    return a_s, a_t


def _onehot(idx: torch.Tensor, V: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(idx, V).double()


def _normalise(joint: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Normalise ``joint`` [..., V] over x_s; where it is all zero use the structural answer."""
    V = joint.shape[-1]
    Z = joint.sum(-1, keepdim=True)
    fallback = torch.where((x_t == mask_id).unsqueeze(-1), _onehot(x0, V), _onehot(x_t, V))
    return torch.where(Z > 0, joint / Z.clamp_min(1e-300), fallback)


def _kl_rows(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sum_v q log(q / p)`` per row: 0 where q = 0, +inf where q > 0 = p."""
    # p is replaced where q = 0 *before* dividing: a 0/0 in the unused branch would make the
    # gradient NaN (torch.where passes 0 * nan back to p)
    ratio = torch.where(q > 0, q / torch.where(q > 0, p, torch.ones_like(p)), torch.ones_like(q))
    return (q * torch.log(ratio)).sum(-1)


# ---------------------------------------------------------------------------- cores
def _posterior_flat(x0, x_t, alpha_s, alpha_t, mask_id):
    """``q(x_s | x_t, x0) ∝ Q_{s->t}[x_s, x_t] Qbar_s[x0, x_s]`` for n positions, [n, V]; alphas [n, V]."""
    col = one_step_matrix(alpha_s, alpha_t, mask_id, cols=x_t.unsqueeze(-1)).squeeze(-1)  # Q[:, x_t]
    row = cumulative_matrix(alpha_s, mask_id, rows=x0.unsqueeze(-1)).squeeze(-2)         # Qbar_s[x0, :]
    return _normalise(col * row, x0, x_t, mask_id)


def _reverse_group(p_hat: torch.Tensor, alpha_s: torch.Tensor, alpha_t: torch.Tensor, x_t: int,
                   mask_id: int, max_elements: int) -> torch.Tensor:
    """``p(x_s | x_t) = sum_{x0'} p_hat(x0') q(x_s | x_t, x0')`` for n positions that share the
    reverse alphas ([V]) and the value ``x_t``: one posterior matrix [x0', x_s], applied as a matmul
    (D3PM style). Only columns x_s with ``Q_{s->t}[x_s, x_t] > 0`` can carry mass, so the matrix is
    built on those columns; rows are built in blocks of at most ``max_elements`` entries. [n, V]."""
    n, V = p_hat.shape
    col = one_step_matrix(alpha_s, alpha_t, mask_id, cols=torch.tensor([x_t], device=p_hat.device)).squeeze(-1)
    support = (col > 0).nonzero().squeeze(-1)  # states that can precede x_t
    out = torch.zeros(n, V, dtype=torch.float64, device=p_hat.device)
    step = max(1, max_elements // max(1, support.numel()))
    for start in range(0, V, step):
        rows = torch.arange(start, min(V, start + step), device=p_hat.device)  # candidate x0'
        joint = cumulative_matrix(alpha_s, mask_id, rows=rows, cols=support) * col[support]  # [R, S]
        Z = joint.sum(-1, keepdim=True)
        post = torch.where(Z > 0, joint / Z.clamp_min(1e-300), torch.zeros_like(joint))
        out[:, support] += p_hat[:, rows] @ post
        undefined = rows[Z.squeeze(-1) == 0]  # x_t unreachable from x0': structural answer
        if undefined.numel():
            if x_t == mask_id:
                out[:, undefined] += p_hat[:, undefined]          # x_s = x0'
            else:
                out[:, x_t] += p_hat[:, undefined].sum(-1)        # x_s = x_t
    return out


def _reverse_flat(p_hat, b, x_t, alpha_s_b, alpha_t_b, mask_id, max_elements):
    """Reverse probabilities for n positions of examples ``b`` [n], grouped by (reverse alphas, x_t)."""
    out = torch.empty_like(p_hat)
    keys = torch.cat([alpha_s_b[b], alpha_t_b[b], x_t.unsqueeze(-1).double()], -1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    for gi in range(int(group.max()) + 1 if group.numel() else 0):
        idx = (group == gi).nonzero().squeeze(-1)
        i0 = int(idx[0])
        out[idx] = _reverse_group(p_hat[idx], alpha_s_b[b[i0]], alpha_t_b[b[i0]], int(x_t[i0]),
                                  mask_id, max_elements)
    return out


# ---------------------------------------------------------------------------- public API
def reference_p_hat(logits_full: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Zero-masked ``p_hat(x0' | x_t)`` [..., V] (float64): the [MASK] logit is -inf."""
    logits = logits_full.double().clone()
    logits[..., mask_id] = float("-inf")
    return logits.softmax(-1)


def reference_q_probs(x0: torch.Tensor, t: torch.Tensor, noise_mask: torch.Tensor, schedule: Schedule,
                      T: int, mask_id: int, V: int) -> torch.Tensor:
    """Forward marginal ``q(x_t | x0) = onehot(x0) @ Qbar_t`` (row x0 of Qbar_t), [B, L, V].
    Non-noised positions keep x0."""
    a_t = forward_alpha_rows(schedule, t, T, x0, noise_mask, V)
    probs = cumulative_matrix(a_t, mask_id, rows=x0.unsqueeze(-1)).squeeze(-2)
    return torch.where(noise_mask.unsqueeze(-1), probs, _onehot(x0, V))


def reference_posterior(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                        noise_mask: torch.Tensor, schedule: Schedule, T: int, mask_id: int, V: int,
                        max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """``q(x_s | x_t, x0)`` [B, L, V] (float64) from the forward matrices; ``t``, ``s`` are [B]."""
    B, L = x0.shape
    a_s = forward_alpha_rows(schedule, s, T, x0, noise_mask, V).reshape(B * L, V)
    a_t = forward_alpha_rows(schedule, t, T, x0, noise_mask, V).reshape(B * L, V)
    x0f, xtf = x0.reshape(-1), x_t.reshape(-1)
    out = torch.empty(B * L, V, dtype=torch.float64, device=x0.device)
    size = max(1, max_elements // V)
    for start in range(0, B * L, size):
        c = slice(start, min(B * L, start + size))
        out[c] = _posterior_flat(x0f[c], xtf[c], a_s[c], a_t[c], mask_id)
    return out.view(B, L, V)


def reference_reverse_probs(logits_full: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                            s: torch.Tensor, schedule: Schedule, T: int, mask_id: int,
                            max_elements: int = DEFAULT_MAX_ELEMENTS, w_min: float = REVERSE_W_MIN) -> torch.Tensor:
    """The full D3PM reverse distribution ``p(x_s | x_t)`` [B, L, V] (float64) at every position.

    ``logits_full`` [B, L, V] are the denoiser's logits everywhere; ``t``, ``s`` [B]. The reverse
    matrices come from ``schedule.alpha_vocab`` only, so nothing about x0 enters.
    """
    B, L, V = logits_full.shape
    p_hat = reference_p_hat(logits_full, mask_id).reshape(B * L, V)
    b = torch.arange(B, device=x_t.device).repeat_interleave(L)
    a_s, a_t = floored_reverse_alphas(schedule, t, s, T, V, w_min)
    out = _reverse_flat(p_hat, b, x_t.reshape(-1), a_s, a_t, mask_id, max_elements)
    return out.view(B, L, V)


def reference_kl_per_position(logits_full: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                              t: torch.Tensor, s: torch.Tensor, noise_mask: torch.Tensor,
                              schedule: Schedule, T: int, mask_id: int,
                              max_elements: int = DEFAULT_MAX_ELEMENTS, w_min: float = REVERSE_W_MIN) -> torch.Tensor:
    """``KL(q(x_s | x_t, x0) || p(x_s | x_t))`` at every noised position, [B, L] (float64).

    Positions outside ``noise_mask`` are 0. Unmasked noised positions are *computed*, not skipped:
    the matrices give 0 there (carry-over on both sides). +inf where p misses mass that q has.
    """
    B, L, V = logits_full.shape
    sel = noise_mask.reshape(-1).nonzero().squeeze(-1)
    x0f, xtf = x0.reshape(-1)[sel], x_t.reshape(-1)[sel]
    b = sel // L
    a_s = forward_alpha_rows(schedule, s, T, x0, noise_mask, V).reshape(B * L, V)[sel]
    a_t = forward_alpha_rows(schedule, t, T, x0, noise_mask, V).reshape(B * L, V)[sel]
    p_hat = reference_p_hat(logits_full.reshape(B * L, V)[sel], mask_id)
    ra_s, ra_t = floored_reverse_alphas(schedule, t, s, T, V, w_min)
    kl = torch.zeros(B * L, dtype=torch.float64, device=x0.device)
    size = max(1, max_elements // V)
    for start in range(0, sel.numel(), size):
        c = slice(start, min(sel.numel(), start + size))
        q = _posterior_flat(x0f[c], xtf[c], a_s[c], a_t[c], mask_id)
        p = _reverse_flat(p_hat[c], b[c], xtf[c], ra_s, ra_t, mask_id, max_elements)
        kl[sel[c]] = _kl_rows(q, p)
    return kl.view(B, L)


def reference_kl(logits_full: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 s: torch.Tensor, noise_mask: torch.Tensor, schedule: Schedule, T: int, mask_id: int,
                 max_elements: int = DEFAULT_MAX_ELEMENTS, w_min: float = REVERSE_W_MIN) -> torch.Tensor:
    """Per-example KL summed over noised positions, [B] (float64). See :func:`reference_kl_per_position`."""
    return reference_kl_per_position(logits_full, x0, x_t, t, s, noise_mask, schedule, T, mask_id,
                                      max_elements, w_min).sum(-1)


# ---------------------------------------------------------------------------- the dense design
# The original DiffusionBERT / D3PM code works on [B, L, V] tensors at every position: x_t is drawn
# with Gumbel noise over V, the posteriors are products of one-hot rows and matrix columns, and the
# reverse draw is a Gumbel-max over V again. The functions below do the same (float64, every
# position, no closed forms beyond reading matrix entries), so ``bench.py --reference`` can time
# that design. They equal the explicit-matrix functions above (tests/test_diffusion.py), the dense
# loss equals ``AbsorbingDiffusion.loss`` (tests/test_reference_loss.py), and they cost O(B L V)
# per call instead of O(N V^2).
def _gumbel_argmax(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` [..., V] by Gumbel-max over all V entries (float64)."""
    u = torch.rand(probs.shape, dtype=torch.float64, device=probs.device, generator=generator)
    g = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
    return (torch.log(probs.double()) + g).argmax(-1)


def dense_q_sample(x0: torch.Tensor, t: torch.Tensor, noise_mask: torch.Tensor, schedule: Schedule, T: int,
                   mask_id: int, V: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x_t ~ q(x_t | x0)`` from the [B, L, V] marginal ``onehot(x0) @ Qbar_t`` by Gumbel-max. [B, L]."""
    return _gumbel_argmax(reference_q_probs(x0, t, noise_mask, schedule, T, mask_id, V), generator)


def dense_reverse_probs(logits_full: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                        schedule: Schedule, T: int, mask_id: int, w_min: float = REVERSE_W_MIN) -> torch.Tensor:
    """``p(x_s | x_t) = sum_{x0'} p_hat(x0') q(x_s | x_t, x0')`` [B, L, V] (float64), from [B, L, V] tensors.

    Under the absorbing matrices ``q(x_s | x_t, x0')`` is non-zero only at ``x_s = x0'`` and at
    [MASK], so the sum over x0' is two [B, L, V] products (no [V, V] matrix): with ``Z(x0') =
    Qbar_t[x0', x_t]``, ``p(v) = p_hat(v) Qbar_s[v, v] Q_{s->t}[v, x_t] / Z(v)`` and
    ``p([MASK]) += sum_x0' p_hat(x0') Qbar_s[x0', MASK] Q_{s->t}[MASK, x_t] / Z(x0')``; where ``Z = 0``
    the structural answer of :func:`_reverse_group` is used. Equals :func:`reference_reverse_probs`.
    """
    B, L, V = logits_full.shape
    p_hat = reference_p_hat(logits_full, mask_id)                                   # [B, L, V]
    a_s, a_t = (a[:, None, :].expand(B, L, V) for a in floored_reverse_alphas(schedule, t, s, T, V, w_min))
    cols = x_t.unsqueeze(-1)
    col_st = one_step_matrix(a_s, a_t, mask_id, cols=cols).squeeze(-1)             # Q_{s->t}[v, x_t]
    Z = cumulative_matrix(a_t, mask_id, cols=cols).squeeze(-1)                     # Qbar_t[v, x_t]
    is_mask = torch.arange(V, device=x_t.device) == mask_id
    keep_s = torch.where(is_mask, torch.ones_like(a_s), a_s)                       # Qbar_s[v, v]
    to_mask_s = torch.where(is_mask, torch.ones_like(a_s), 1.0 - a_s)              # Qbar_s[v, MASK]
    defined = Z > 0
    inv_Z = torch.where(defined, 1.0 / Z.clamp_min(1e-300), torch.zeros_like(Z))
    keep = torch.where(is_mask, torch.zeros_like(a_s), keep_s * col_st * inv_Z)    # x_s = x0' (not [MASK])
    to_mask = to_mask_s * col_st[..., mask_id:mask_id + 1] * inv_Z                 # x_s = [MASK]
    p = p_hat * keep
    p[..., mask_id] += (p_hat * to_mask).sum(-1)
    lost = (p_hat * (~defined)).sum(-1)                                            # x_t unreachable from x0'
    x_t_masked = (x_t == mask_id).unsqueeze(-1)
    p = p + torch.where(x_t_masked, p_hat * (~defined), torch.zeros_like(p))
    visible = torch.nn.functional.one_hot(x_t, V).double() * lost.unsqueeze(-1)
    return p + torch.where(x_t_masked, torch.zeros_like(p), visible)


def dense_kl_per_position(logits_full: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                          s: torch.Tensor, noise_mask: torch.Tensor, schedule: Schedule, T: int, mask_id: int,
                          w_min: float = REVERSE_W_MIN) -> torch.Tensor:
    """``KL(q(x_s | x_t, x0) || p(x_s | x_t))`` [B, L] (float64) computed at every position as [B, L, V]
    tensors, then kept on ``noise_mask``. Differentiable in ``logits_full``."""
    B, L, V = logits_full.shape
    q = reference_posterior(x0, x_t, t, s, noise_mask, schedule, T, mask_id, V, max_elements=B * L * V)
    p = dense_reverse_probs(logits_full, x_t, t, s, schedule, T, mask_id, w_min)
    return torch.where(noise_mask, _kl_rows(q, p), torch.zeros((), dtype=torch.float64, device=x0.device))


def dense_sample_step(logits_full: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                      noise_mask: torch.Tensor, schedule: Schedule, T: int, mask_id: int,
                      generator: torch.Generator | None = None, w_min: float = REVERSE_W_MIN) -> torch.Tensor:
    """One reverse step of the dense design: a Gumbel-max draw from ``p(x_s | x_t)`` at every position. [B, L]."""
    x_s = _gumbel_argmax(dense_reverse_probs(logits_full, x_t, t, s, schedule, T, mask_id, w_min), generator)
    return torch.where(noise_mask, x_s, x_t)


def dense_loss_at(logits_full: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  noise_mask: torch.Tensor, schedule: Schedule, T: int, mask_id: int, hybrid_lambda: float,
                  w_min: float = REVERSE_W_MIN) -> torch.Tensor:
    """``AbsorbingDiffusion.loss`` (``weighting="elbo"``) at a given ``t`` [B] and ``x_t`` [B, L], from
    the logits at every position ``logits_full`` [B, L, V]: ``T * KL(t -> t - 1)`` summed over the noised
    positions, divided by their number, plus ``hybrid_lambda`` times the mean ``CE(p_hat, x0)`` over the
    masked positions (D3PM's hybrid loss). A float64 scalar, differentiable in ``logits_full``."""
    kl = dense_kl_per_position(logits_full, x0, x_t, t, t - 1, noise_mask, schedule, T, mask_id, w_min)
    is_mask = torch.arange(logits_full.shape[-1], device=x0.device) == mask_id
    logp = logits_full.double().masked_fill(is_mask, float("-inf")).log_softmax(-1)  # zero masking
    masked = (x_t == mask_id) & noise_mask
    ce = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)[masked].sum() / masked.sum().clamp_min(1)
    return T * kl.sum() / noise_mask.sum().clamp_min(1) + hybrid_lambda * ce


def dense_loss(denoise, x0: torch.Tensor, noise_mask: torch.Tensor, attention_mask: torch.Tensor,
               schedule: Schedule, T: int, mask_id: int, V: int, hybrid_lambda: float,
               generator: torch.Generator | None = None, w_min: float = REVERSE_W_MIN) -> torch.Tensor:
    """One training loss of the dense design: ``t`` uniform on {1..T} per example, ``x_t`` by
    :func:`dense_q_sample`, the logits at every position (``denoise(x_t, t, attention_mask, None)``
    -> [B, L, V]), then :func:`dense_loss_at`. The same estimator as ``AbsorbingDiffusion.loss``."""
    t = torch.randint(1, T + 1, (x0.shape[0],), device=x0.device, generator=generator)
    x_t = dense_q_sample(x0, t, noise_mask, schedule, T, mask_id, V, generator)
    logits = denoise(x_t, t, attention_mask, None)
    return dense_loss_at(logits, x0, x_t, t, noise_mask, schedule, T, mask_id, hybrid_lambda, w_min)


__all__ = ["one_step_matrix", "cumulative_matrix", "forward_alpha_rows", "reverse_alpha_rows",
           "reference_p_hat", "reference_q_probs", "reference_posterior", "reference_reverse_probs",
           "reference_kl_per_position", "reference_kl", "dense_q_sample", "dense_reverse_probs",
           "dense_kl_per_position", "dense_loss_at", "dense_loss", "dense_sample_step"]
