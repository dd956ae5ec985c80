"""Transcriptions of the released DiffuSeq (Shark-NLP/DiffuSeq) and Tang et al.
(ZetangForward/Bridge_Gap_Diffusion) code that the tests use as oracles: retyped in plain Python/torch
from ``diffuseq/gaussian_diffusion.py`` of each repository, keeping their structure (two-pointer maps,
accumulated strides, ``mean_flat``, the loss dictionary), not our code's. Nothing here is imported by
the package."""
from __future__ import annotations

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """``diffuseq/utils/nn.py``: the mean over all non-batch dimensions."""
    return x.mean(dim=list(range(1, x.dim())))


def space_timesteps_adp(num_timesteps: int, n: int) -> set[int]:
    """Bridge_Gap_Diffusion ``space_timesteps(num_timesteps, "adp_<n>")``: raises ValueError where the
    release does."""
    props = [0.08400242284240157, 0.36759523570876984, 0.5484023414488285]
    section_counts = [1, 1, 1]
    section_counts[0] = max(round(props[0] * n), 1)
    section_counts[1] = max(round(props[1] * n), 1)
    section_counts[2] = n - section_counts[0] - section_counts[1]
    section_counts[0] += 1
    section_counts[1] += 1
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        if i != len(section_counts) - 1:
            taken_steps.sort()
            all_steps += taken_steps[:-1]
        else:
            all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def fill_noise_map(a: list[float], simi_noise: float) -> tuple[dict, dict]:
    """Bridge_Gap_Diffusion ``GaussianDiffusion.fill_noise_map`` on ``a = sqrt(1 - alphabar)``:
    ``(up_map, down_map)``."""
    up_map, down_map = {}, {}
    lp = rp = 0
    while rp < len(a):
        if a[rp] - a[lp] <= simi_noise:
            rp += 1
        else:
            up_map[lp] = rp - 1
            lp += 1
    rp = lp = len(a) - 1
    while lp >= 0:
        if a[rp] - a[lp] <= simi_noise:
            lp -= 1
        else:
            down_map[rp] = lp + 1
            rp -= 1
    return up_map, down_map


def t_similar_by_noise(t: list[int], up_map: dict, down_map: dict, up: list[bool], pick) -> tuple[list[int], list[bool]]:
    """Bridge_Gap_Diffusion ``make_t_similar_by_noise(..., use_random=True)``: ``up[i]`` is the
    released ``direction > 0``; ``pick(i, lo, hi)`` stands for ``random.randint(lo, hi)`` (inclusive).
    Returns ``t_similar`` and ``tt_mask``."""
    out = list(t)
    for idx, i in enumerate(t):
        if up[idx]:
            if i in up_map and up_map[i] != i:
                out[idx] = pick(idx, i + 1, up_map[i])
        else:
            if i in down_map and down_map[i] != i:
                out[idx] = pick(idx, down_map[i], i - 1)
    return out, [a != b for a, b in zip(out, t)]


def token_discrete_loss(x, get_logits, input_ids, mask=None):
    """``_token_discrete_loss``: CE of ``get_logits(x)`` per position; masked mean or plain mean over L."""
    logits = get_logits(x)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), input_ids.reshape(-1),
                                            reduction="none").view(input_ids.shape)
    if mask is not None:
        nll = nll * mask
        return nll.sum(dim=-1) / mask.sum(dim=-1)
    return nll.mean(dim=-1)


def q_sample(sqrt_ab, sqrt_1m_ab, x_start, t, noise, mask):
    """``q_sample`` with the anchoring mask (0: keep x_start)."""
    x_t = sqrt_ab[t].float()[:, None, None] * x_start + sqrt_1m_ab[t].float()[:, None, None] * noise
    return torch.where(mask[..., None] == 0, x_start, x_t)


def diffuseq_losses(model, get_logits, alphabar, input_ids, input_mask, t, x_start_mean, x_start, noise) -> dict:
    """Shark-NLP/DiffuSeq ``training_losses_seq2seq`` with the model's x0 prediction, given the embedding
    ``x_start_mean``, ``x_start = x_start_mean + std * eps0`` and the noise of ``x_t``."""
    sqrt_ab, sqrt_1m_ab = alphabar.sqrt(), (1 - alphabar).sqrt()
    x_t = q_sample(sqrt_ab, sqrt_1m_ab, x_start, t, noise, input_mask)
    terms = {}
    target = x_start
    model_output = model(x_t, t)
    terms["mse"] = mean_flat((target - model_output) ** 2)
    t0_loss = mean_flat((x_start_mean - model_output) ** 2)
    terms["mse"] = torch.where(t == 0, t0_loss, terms["mse"])
    out_mean = sqrt_ab[-1].float() * x_start
    tT_loss = mean_flat(out_mean ** 2)
    decoder_nll = token_discrete_loss(x_start, get_logits, input_ids)
    terms["loss"] = terms["mse"] + decoder_nll + tT_loss
    terms["decoder_nll"], terms["tT"] = decoder_nll, tT_loss
    return terms


def tang_losses(model, get_logits, alphabar, input_ids, input_mask, t, t_similar, tt_mask, x_start_mean, x_start,
                noise, noise2, simi_lambda) -> dict:
    """Bridge_Gap_Diffusion ``training_losses_seq2seq`` with ``simi_penalty`` an l2 one, given the drawn
    ``t_similar``/``tt_mask`` and the two noises; the model is called twice, as released."""
    sqrt_ab, sqrt_1m_ab = alphabar.sqrt(), (1 - alphabar).sqrt()
    x_t = q_sample(sqrt_ab, sqrt_1m_ab, x_start, t, noise, input_mask)
    x_t_similar = q_sample(sqrt_ab, sqrt_1m_ab, x_start, t_similar, noise2, input_mask)
    terms = {}
    target = x_start_mean
    model_output = model(x_t, t)
    terms["mse"] = mean_flat((target - model_output) ** 2)
    t0_loss = mean_flat((x_start_mean - model_output) ** 2)
    terms["mse"] = torch.where(t == 0, t0_loss, terms["mse"])
    tT_loss = mean_flat((sqrt_ab[-1].float() * x_start) ** 2)
    decoder_nll = token_discrete_loss(x_start, get_logits, input_ids)
    model_output_from_t_similar = model(x_t_similar, t_similar)
    terms["mse_similar"] = mean_flat((target - model_output_from_t_similar) ** 2)
    t0_loss_similar = mean_flat((x_start_mean - model_output_from_t_similar) ** 2)
    terms["mse_similar"] = torch.where(t_similar == 0, t0_loss_similar, terms["mse_similar"])
    terms["mse"] = terms["mse"] + terms["mse_similar"]
    tT_loss = tT_loss * 2
    decoder_nll = decoder_nll * 2
    if simi_lambda > 0:
        raise NotImplementedError("the l2 penalty needs simi_lambda <= 0")
    terms["l2"] = -mean_flat((model_output_from_t_similar - model_output) ** 2) * simi_lambda
    terms["loss"] = terms["mse"] + decoder_nll + tT_loss
    terms["loss"] = terms["loss"] + terms["l2"] * tt_mask
    terms["loss"] = terms["loss"] / 2
    return terms


def sqrt_betas(T: int) -> torch.Tensor:
    """``get_named_beta_schedule('sqrt', T)``: ``betas_for_alpha_bar`` of ``1 - sqrt(t + 1e-4)``,
    ``beta_i = min(1 - abar((i + 1) / T) / abar(i / T), 0.999)``; float64."""
    def alpha_bar(t):
        return 1 - (t + 0.0001) ** 0.5
    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                        dtype=torch.float64)


class SpacedDiffusion:
    """``respace.SpacedDiffusion`` (in ``gaussian_diffusion.py`` of both repositories) over
    ``GaussianDiffusion.__init__``'s tables: the kept steps get ``beta' = 1 - abar_i / abar_last_kept``,
    and every posterior table is rebuilt from those betas (float64, as released)."""

    def __init__(self, use_timesteps, betas: torch.Tensor):
        use_timesteps = set(use_timesteps)
        self.timestep_map, new_betas, last = [], [], 1.0
        for i, ab in enumerate(torch.cumprod(1 - betas.double(), 0).tolist()):
            if i in use_timesteps:
                new_betas.append(1 - ab / last)
                last = ab
                self.timestep_map.append(i)
        b = torch.tensor(new_betas, dtype=torch.float64)
        self.num_timesteps = len(b)
        ac = torch.cumprod(1 - b, 0)
        acp = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.posterior_variance = b * (1 - acp) / (1 - ac)
        self.posterior_mean_coef1 = b * acp.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - acp) * (1 - b).sqrt() / (1 - ac)
        # p_mean_variance, fixed-large: log(append(posterior_variance[1], betas[1:]))
        self.model_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], b[1:]]))

    @staticmethod
    def _extract(arr: torch.Tensor, t: torch.Tensor, shape) -> torch.Tensor:
        """``_extract_into_tensor``: index, then ``.float()``, broadcast to ``shape``."""
        res = arr[t].float()
        while res.dim() < len(shape):
            res = res[..., None]
        return res.expand(shape)

    def p_sample(self, model, x, t, denoised_fn, mask, x_start, noise):
        """``p_sample`` with ``p_mean_variance`` through ``_WrappedModel`` (the model sees the original step
        ``timestep_map[t]``), ``clip_denoised=False``; ``mask == 0`` positions reset to ``x_start``."""
        model_output = model(x, torch.tensor(self.timestep_map, dtype=t.dtype)[t])
        pred_xstart = denoised_fn(model_output, t) if denoised_fn is not None else model_output
        mean = (self._extract(self.posterior_mean_coef1, t, x.shape) * pred_xstart
                + self._extract(self.posterior_mean_coef2, t, x.shape) * x)
        log_var = self._extract(self.model_log_variance, t, x.shape)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = mean + nonzero_mask * torch.exp(0.5 * log_var) * noise
        return {"sample": torch.where(mask == 0, x_start, sample), "pred_xstart": pred_xstart}

    def p_sample_loop(self, model, noise, denoised_fn, mask, x_start, randn):
        """``p_sample_loop_progressive`` with gap 1 and ``clamp_first=True, clamp_step=0`` (sample_seq2seq.py:
        ``denoised_fn`` at every step): from ``noise`` down the kept steps; ``randn(shape)`` gives each step's
        noise. Returns the list of per-step outputs."""
        x, outs = noise, []
        for i in range(self.num_timesteps)[::-1]:
            t = torch.tensor([i] * x.shape[0])
            out = self.p_sample(model, x, t, denoised_fn, mask, x_start, randn(x.shape))
            outs.append(out)
            x = out["sample"]
        return outs


def get_efficient_knn(model_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """``rounding.get_efficient_knn``: ``|e|^2 + |x|^2 - 2 e.x`` clamped at 0, ``topk(-dist, 1)`` over the
    vocabulary; returns the indices [N]."""
    emb_norm = (model_emb ** 2).sum(-1).view(-1, 1)
    text = text_emb.view(-1, text_emb.size(-1))
    arr_norm = (text ** 2).sum(-1).view(-1, 1)
    dist = torch.clamp(emb_norm + arr_norm.t() - 2.0 * model_emb @ text.t(), 0.0, float("inf"))
    return torch.topk(-dist, k=1, dim=0).indices[0]


def denoised_fn_round(model_emb: torch.Tensor, text_emb: torch.Tensor, t) -> torch.Tensor:
    """``rounding.denoised_fn_round`` with ``clamp_skip = -1``, ``top_k = top_p = 0``: every vector (source
    too) replaced by its L2-nearest embedding row."""
    return model_emb[get_efficient_knn(model_emb, text_emb)].view(text_emb.shape)
