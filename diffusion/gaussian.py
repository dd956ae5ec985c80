"""Continuous Gaussian diffusion on word embeddings with partial noising (DiffuSeq, Gong et al. 2023),
and Tang et al. (2023)'s distance-penalty post-training. See ALGORITHMS.md §2 and §3.

Conventions:

* ``T`` steps, ``t = 0..T-1`` (0-based as in DiffuSeq); ``alphabar_t = prod_{s<=t} (1 - beta_s)``.
* ``z0 = Emb(w) + sqrt(beta_0) eps`` [B, L, D]; ``z_t = sqrt(alphabar_t) z0 + sqrt(1 - alphabar_t) eps``
  on the **target** positions (``noise_mask`` [B, L] bool); source positions are reset to ``z0``.
* The denoiser predicts z0 (x0-parameterisation). It is any object with
  ``denoiser(z_t [B,L,D], t [B]) -> x0_hat [B,L,D]``, ``denoiser.embed(ids [B,L]) -> [B,L,D]``,
  ``denoiser.logits(z [...,D]) -> [...,V]`` (the rounding head tied to Emb) and
  ``denoiser.embedding_weight`` [V, D].

Averaging (``average``):

* ``all`` (DiffuSeq as released, ``mean_flat``): the MSE and ``L_T`` are means over every position
  of the canvas [L, D] (source, target and padding), and the rounding NLL is unmasked, a mean over
  all L positions. The source tokens' embeddings are thus trained by the NLL too, and the network
  learns to copy the source (its output there is discarded when sampling).
* ``target``: all three are means over the target positions only (the source never enters the loss).

Target padding is part of the target either way: the model learns to generate [PAD].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .absorbing import SampleOutput

MAX_BETA = 0.999
LOSS_AVERAGES = ("all", "target")
NEIGHBOUR_MAPS = ("released", "complete")


def _betas_from_alphabar(fn, T: int) -> torch.Tensor:
    """``beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999)`` (Nichol & Dhariwal 2021, Eq. 17 discretised)."""
    s = torch.arange(T + 1, dtype=torch.float64) / T
    a = fn(s)
    return (1 - a[1:] / a[:-1]).clamp(max=MAX_BETA)


def gaussian_betas(name: str, T: int) -> torch.Tensor:
    """One-step betas [T] float64 for the named schedule.

    * ``sqrt`` (DiffuSeq / Diffusion-LM, Li et al. 2022, §4.2): ``abar(s) = 1 - sqrt(s + 1e-4)``;
      ``alphabar_0 = 0.98536`` for T = 2000.
    * ``cosine`` (Nichol & Dhariwal 2021, Eq. 17): ``abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2``.
    * ``linear`` (Ho et al. 2020, scaled to T): betas from ``1e-4 * 1000/T`` to ``0.02 * 1000/T``.
    """
    if T < 2:
        raise ValueError(f"need at least 2 diffusion steps, got T={T}")
    if name == "sqrt":
        return _betas_from_alphabar(lambda s: 1 - torch.sqrt(s + 1e-4), T)
    if name == "cosine":
        return _betas_from_alphabar(lambda s: torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2, T)
    if name == "linear":
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    raise ValueError(f"unknown Gaussian schedule {name!r}; choose one of {', '.join(GAUSSIAN_SCHEDULES)}")


GAUSSIAN_SCHEDULES = ("sqrt", "linear", "cosine")


def chunked_cross_entropy(logits_fn, z: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``-log softmax(logits_fn(z))[y]`` per row, for ``z`` [N, D] and ``y`` [N] -> [N].

    Row chunks keep each [chunk, V] logits buffer small (256 x 30522 floats is 31 MB): on the CPU one
    [N, V] buffer per step is allocated fresh from the OS and page faults dominate; chunking halves the
    time of this term. The result and its gradients are those of the unchunked computation.
    """
    parts = [torch.nn.functional.cross_entropy(logits_fn(z[i:i + chunk]).float(), y[i:i + chunk], reduction="none")
             for i in range(0, len(z), chunk)]
    return torch.cat(parts) if parts else z.new_zeros(0)


@dataclass
class Respaced:
    """A sampling chain on the kept steps ``timesteps`` [n] (ascending, original indices for the network)
    with betas recomputed from alphabar there: ``beta'_i = 1 - alphabar[k_i] / alphabar[k_{i-1}]``."""
    timesteps: torch.Tensor    # [n] long
    alphabar: torch.Tensor     # [n] float64
    betas: torch.Tensor        # [n] float64
    coef_x0: torch.Tensor      # posterior mean coefficient of x0_hat, [n]
    coef_zt: torch.Tensor      # posterior mean coefficient of z_t, [n]


@dataclass
class GaussianLossOutput:
    loss: torch.Tensor         # scalar: mean of weights * per_example
    per_example: torch.Tensor  # [B] unweighted loss (what the lossaware sampler records)
    mse: torch.Tensor          # [B]
    nll: torch.Tensor          # [B] rounding NLL of z0, averaged as the loss's ``average`` says
    t_T: torch.Tensor          # [B] L_T
    penalty: torch.Tensor      # [B] distance penalty (zeros without post-training)


@dataclass
class GaussianSampleOutput(SampleOutput):
    z0: torch.Tensor | None = None  # [B, L, D] final continuous sample


class GaussianDiffusion:
    """``q_sample``, ``loss``, ``post_train_loss``, ``respace``, ``step`` and ``sample`` for DiffuSeq."""

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.double()
        self.num_steps = len(betas)
        self.alphabar = torch.cumprod(1 - self.betas, 0)
        self.sqrt_ab = self.alphabar.sqrt()
        self.sqrt_1m_ab = (1 - self.alphabar).sqrt()
        # Tang et al.'s neighbourhoods, cached for one (simi_noise, maps): see neighbourhoods()
        self._neighbourhood: tuple[tuple[float, str], torch.Tensor, torch.Tensor] | None = None

    # ---- forward process
    def _coef(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(like.device)[t].to(like.dtype)[:, None, None]

    def z0_from_embedding(self, emb: torch.Tensor, generator=None) -> torch.Tensor:
        """``z0 = Emb(w) + sqrt(beta_0) eps`` [B, L, D]."""
        eps = torch.randn(emb.shape, device=emb.device, dtype=emb.dtype, generator=generator)
        return emb + math.sqrt(float(self.betas[0])) * eps

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise_mask: torch.Tensor,
                 noise: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """Partial noising: ``z_t`` on the target positions, ``z0`` on the source. [B, L, D]."""
        if noise is None:
            noise = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype, generator=generator)
        z_t = self._coef(self.sqrt_ab, t, z0) * z0 + self._coef(self.sqrt_1m_ab, t, z0) * noise
        return torch.where(noise_mask[..., None], z_t, z0)

    # ---- loss
    @staticmethod
    def _position_mean(x: torch.Tensor, noise_mask: torch.Tensor, average: str) -> torch.Tensor:
        """Mean over positions (and the last dim if x is [B, L, D]) -> [B]: every position for ``all``
        (DiffuSeq's ``mean_flat``), the target positions for ``target``."""
        if x.dim() == 3:
            x = x.mean(-1)
        if average == "all":
            return x.mean(1)
        if average != "target":
            raise ValueError(f"unknown loss average {average!r}; choose one of {', '.join(LOSS_AVERAGES)}")
        m = noise_mask.to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)

    def _target(self, emb: torch.Tensor, z0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What x0_hat should be: z0, except at t = 0 where it is Emb(w) itself (DiffuSeq)."""
        return torch.where((t == 0)[:, None, None], emb, z0)

    def _common_terms(self, denoiser, ids, noise_mask, z0, average):
        """Rounding NLL ``-log p(w | z0)`` through the tied head and ``L_T = mean |sqrt(alphabar_T) z0|^2``,
        both of z0 (not Emb(w)), averaged as ``average`` says -> [B], [B]."""
        sel = torch.ones_like(noise_mask) if average == "all" else noise_mask
        nll_tok = chunked_cross_entropy(denoiser.logits, z0[sel], ids[sel])
        nll = torch.zeros(ids.shape, dtype=nll_tok.dtype, device=ids.device)
        nll[sel] = nll_tok
        nll = self._position_mean(nll, noise_mask, average)
        t_T = self._position_mean((float(self.sqrt_ab[-1]) * z0).pow(2), noise_mask, average)
        return nll, t_T

    def loss(self, denoiser, ids: torch.Tensor, noise_mask: torch.Tensor, t: torch.Tensor,
             weights: torch.Tensor | None = None, generator=None, average: str = "all") -> GaussianLossOutput:
        """DiffuSeq's loss (``training_losses_seq2seq``) for ``ids`` [B, L] at steps ``t`` [B]:
        MSE(x0_hat, z0) + rounding NLL + L_T, averaged as ``average`` says (module docstring)."""
        emb = denoiser.embed(ids)
        z0 = self.z0_from_embedding(emb, generator)
        x0_hat = denoiser(self.q_sample(z0, t, noise_mask, generator=generator), t)
        mse = self._position_mean((x0_hat.float() - self._target(emb, z0, t).float()).pow(2), noise_mask, average)
        nll, t_T = self._common_terms(denoiser, ids, noise_mask, z0, average)
        per_example = mse + nll + t_T
        w = torch.ones_like(per_example) if weights is None else weights.to(per_example.dtype)
        return GaussianLossOutput((w * per_example).mean(), per_example.detach(), mse.detach(), nll.detach(),
                                  t_T.detach(), torch.zeros_like(mse))

    # ---- Tang et al.'s post-training
    def neighbourhoods(self, simi_noise: float, maps: str = "released") -> tuple[torch.Tensor, torch.Tensor]:
        """``lo`` [T], ``hi`` [T]: the steps t' that may be drawn below and above each t, as the inclusive
        ranges ``lo[t]..t-1`` and ``t+1..hi[t]`` (``lo[t] = t`` or ``hi[t] = t``: that side is empty).

        * ``complete``: every t' with ``|a_t' - a_t| <= simi_noise``, ``a_t = sqrt(1 - alphabar_t)``.
        * ``released`` (Tang et al.'s ``fill_noise_map``): the same ranges, except that a t with no step
          beyond the neighbourhood on a side gets no map entry there, so that side is empty: no step
          above when ``a_{T-1} - a_t <= simi_noise`` (the top of the chain: t >= 1632 at T = 2000, sqrt,
          0.05) and none below when ``a_t - a_0 <= simi_noise`` (there t = 0, 1).
        """
        if maps not in NEIGHBOUR_MAPS:
            raise ValueError(f"unknown neighbourhood maps {maps!r}; choose one of {', '.join(NEIGHBOUR_MAPS)}")
        key = (simi_noise, maps)
        if self._neighbourhood is None or self._neighbourhood[0] != key:
            a = self.sqrt_1m_ab
            lo = torch.searchsorted(a, a - simi_noise, right=False)
            hi = torch.searchsorted(a, a + simi_noise, right=True) - 1
            if maps == "released":
                t = torch.arange(self.num_steps)
                lo = torch.where(lo == 0, t, lo)
                hi = torch.where(hi == self.num_steps - 1, t, hi)
            self._neighbourhood = (key, lo, hi)
        return self._neighbourhood[1], self._neighbourhood[2]

    def neighbour_steps(self, t: torch.Tensor, simi_noise: float, maps: str = "released", generator=None):
        """The released ``l2_noise_random`` draw (``make_t_similar_by_noise``): a side of t with
        probability 1/2 each, then t' uniform on that side of the neighbourhood. Returns ``t'`` [B] and
        ``valid`` [B] bool (False where that side is empty; there ``t' = t`` and the penalty is dropped).

        From ``u = rand(2, B)`` (float64): below if ``u[0] < 1/2``; on the side's range ``first..last``
        (``lo[t]..t-1`` or ``t+1..hi[t]``), ``t' = first + floor(u[1] * n)``, n the side's size (the
        released ``random.randint(first, last)``)."""
        lo, hi = (x.to(t.device) for x in self.neighbourhoods(simi_noise, maps))
        u = torch.rand((2,) + t.shape, device=t.device, generator=generator, dtype=torch.float64)
        below = u[0] < 0.5
        first = torch.where(below, lo[t], t + 1)
        n_side = torch.where(below, t - lo[t], hi[t] - t)
        t2 = first + (u[1] * n_side).floor().long()
        valid = n_side > 0
        return torch.where(valid, t2, t), valid

    def post_train_loss(self, denoiser, ids: torch.Tensor, noise_mask: torch.Tensor, t: torch.Tensor,
                        weights: torch.Tensor | None = None, *, simi_lambda: float = -2.0,
                        simi_noise: float = 0.05, variant: str = "l2_noise_random", maps: str = "released",
                        average: str = "all", generator=None) -> GaussianLossOutput:
        """Tang et al. (2023), Eq. 9 as released (``training_losses_seq2seq`` with ``simi_penalty``):

        ``1/2 [mse(f(z_t,t), Emb w) + mse(f(z_t',t'), Emb w) + 2 nll + 2 L_T - simi_lambda * valid * mean|f(z_t,t) - f(z_t',t')|^2]``

        * The MSE target is ``Emb(w)`` at every t (DiffuSeq's own loss uses z0 for t > 0); the rounding
          NLL and ``L_T`` are those of z0, doubled as released.
        * The halving covers the penalty: the released ``simi_lambda = -2`` is a weight of 1.
          ``simi_lambda`` must be <= 0 (the released code raises for a positive one).
        * ``valid``: t' was drawn from a non-empty side (:meth:`neighbour_steps` with ``maps``).
        * ``average``: as in :meth:`loss`; the penalty is averaged the same way.

        Variants of z_t':

        * ``l2_noise_random`` (released, default): z_t and z_t' noised independently from the same z0;
          both predictions come from one batched network call.
        * ``self_renoise`` (the paper's figure): z_t' is the model's own (detached) prediction at t
          re-noised to t'; this needs a second, sequential call.
        """
        if simi_lambda > 0:
            raise ValueError(f"simi_lambda must be <= 0 with the l2 penalty (released sign convention: the loss "
                             f"subtracts it), got {simi_lambda}")
        emb = denoiser.embed(ids)
        z0 = self.z0_from_embedding(emb, generator)
        t2, valid = self.neighbour_steps(t, simi_noise, maps, generator)
        z_t = self.q_sample(z0, t, noise_mask, generator=generator)
        if variant == "l2_noise_random":
            z_t2 = self.q_sample(z0, t2, noise_mask, generator=generator)
            both = denoiser(torch.cat([z_t, z_t2]), torch.cat([t, t2]))
            x0_hat, x0_hat2 = both.chunk(2)
        elif variant == "self_renoise":
            x0_hat = denoiser(z_t, t)
            renoised = self.q_sample(x0_hat.detach().to(z0.dtype), t2, noise_mask, generator=generator)
            x0_hat2 = denoiser(torch.where(noise_mask[..., None], renoised, z0), t2)
        else:
            raise ValueError(f"unknown post-training penalty {variant!r}")
        x0_hat, x0_hat2, target = x0_hat.float(), x0_hat2.float(), emb.float()
        mse1 = self._position_mean((x0_hat - target).pow(2), noise_mask, average)
        mse2 = self._position_mean((x0_hat2 - target).pow(2), noise_mask, average)
        nll, t_T = self._common_terms(denoiser, ids, noise_mask, z0, average)
        penalty = self._position_mean((x0_hat - x0_hat2).pow(2), noise_mask, average) * valid.to(x0_hat.dtype)
        per_example = 0.5 * (mse1 + mse2 + 2 * nll + 2 * t_T - simi_lambda * penalty)
        w = torch.ones_like(per_example) if weights is None else weights.to(per_example.dtype)
        return GaussianLossOutput((w * per_example).mean(), per_example.detach(), (0.5 * (mse1 + mse2)).detach(),
                                  nll.detach(), t_T.detach(), penalty.detach())

    # ---- sampling
    def respace(self, timesteps) -> Respaced:
        """The chain on the kept steps (see :mod:`diffusion.respacing`), with consistent betas."""
        k = torch.as_tensor(sorted(int(s) for s in timesteps), dtype=torch.long)
        if len(k) == 0 or int(k[0]) != 0 or int(k[-1]) >= self.num_steps or len(set(k.tolist())) != len(k):
            raise ValueError(f"respacing needs distinct steps in [0, {self.num_steps}) starting at 0")
        ab = self.alphabar[k]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        betas = 1 - ab / ab_prev
        coef_x0 = betas * ab_prev.sqrt() / (1 - ab)         # Ho et al. 2020, Eq. 7
        coef_zt = (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)
        return Respaced(k, ab, betas, coef_x0, coef_zt)

    @staticmethod
    def nearest_embedding(z: torch.Tensor, table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Index of the L2-nearest row of ``table`` [V, D] for each row of ``z`` [N, D] -> [N] long.

        ``argmin |z - e|^2 = argmin (|e|^2 - 2 z.e)``; computed in row chunks to bound the [N, V] buffer.
        """
        table = table.to(z.dtype)
        e2 = table.pow(2).sum(-1)
        # .min(-1).indices: the same first-minimum index as argmin, and faster on the CPU (measured 5.7 vs 9.6 ms
        # for [256, 30522])
        out = [torch.addmm(e2, z[i:i + chunk], table.t(), alpha=-2.0).min(-1).indices for i in range(0, len(z), chunk)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    def step(self, denoiser, z_t: torch.Tensor, i: int, chain: Respaced, noise_mask: torch.Tensor,
             z_src: torch.Tensor, clamp: bool = True, generator=None):
        """One reverse step from kept index ``i`` to ``i - 1``: predict x0, clamp it to the nearest
        embedding on the target, take the posterior mean of ``q(z_{i-1} | z_i, x0_hat)``, add
        ``sqrt(beta'_i) eps`` (DiffuSeq's fixed-large variance; no noise at i = 0) and reset the source.
        Returns ``(z_prev [B, L, D], tokens [N])`` with the clamped tokens of the N target positions."""
        B = z_t.shape[0]
        t = chain.timesteps[i].to(z_t.device).expand(B)
        x0_hat = denoiser(z_t, t).to(z_t.dtype)
        tokens = None
        if clamp:
            table = denoiser.embedding_weight.detach()
            tokens = self.nearest_embedding(x0_hat[noise_mask], table)
            x0_hat = x0_hat.clone()
            x0_hat[noise_mask] = table[tokens].to(x0_hat.dtype)
        mean = float(chain.coef_x0[i]) * x0_hat + float(chain.coef_zt[i]) * z_t
        if i > 0:
            eps = torch.randn(z_t.shape, device=z_t.device, dtype=z_t.dtype, generator=generator)
            mean = mean + math.sqrt(float(chain.betas[i])) * eps
        return torch.where(noise_mask[..., None], mean, z_src), tokens

    @torch.no_grad()
    def sample(self, denoiser, ids: torch.Tensor, noise_mask: torch.Tensor, timesteps=None, clamp: bool = True,
               generator=None) -> GaussianSampleOutput:
        """Generate the target region of ``ids`` [B, L] given its source (positions outside ``noise_mask``).

        The source comes from Emb and the target from N(0, I); after the last step the target tokens
        are the L2-nearest embeddings of z_0 (the same rule as clamping, not DiffuSeq's dot-product
        argmax of the LM head). ``timesteps``: the kept steps (default: all T).
        """
        chain = self.respace(range(self.num_steps) if timesteps is None else timesteps)
        z_src = denoiser.embed(ids)
        z = torch.randn(z_src.shape, device=ids.device, dtype=z_src.dtype, generator=generator)
        z = torch.where(noise_mask[..., None], z, z_src)
        for i in range(len(chain.timesteps) - 1, -1, -1):
            z, tokens = self.step(denoiser, z, i, chain, noise_mask, z_src, clamp, generator)
        # with clamping the last step returns the clamped x0_hat itself (coef_x0 = 1, coef_zt = 0)
        x0 = ids.clone()
        x0[noise_mask] = tokens if clamp else self.nearest_embedding(z[noise_mask], denoiser.embedding_weight.detach())
        n = len(chain.timesteps)
        return GaussianSampleOutput(x0, n, n * ids.shape[0], z)

    def describe(self, name: str) -> dict:
        return {"name": name, "T": self.num_steps, "alphabar_0": float(self.alphabar[0]),
                "alphabar_T": float(self.alphabar[-1])}
