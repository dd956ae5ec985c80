"""The training objective of a run as one ``nn.Module``, so that DDP wraps exactly one forward per
micro-step even when the loss calls the network twice (post-training), and the per-process loss
bookkeeping (what is logged, what the dev set reports, the timestep sampler) lives in one place."""
from __future__ import annotations

import torch
from torch import nn

from diffusion import AbsorbingDiffusion, GaussianDiffusion, make_timestep_sampler
from runtime import dist


class Objective(nn.Module):
    """``forward(batch) -> loss output``; ``denoiser`` is the only submodule (its state dict is the model's)."""

    def __init__(self, denoiser: nn.Module, diffusion, cfg):
        super().__init__()
        self.denoiser, self.diffusion, self.cfg = denoiser, diffusion, cfg
        self.gaussian = isinstance(diffusion, GaussianDiffusion)
        self.timestep_sampler = make_timestep_sampler(cfg.timestep_sampler, cfg.num_steps) if self.gaussian else None
        # the names of the logged training statistics, in the order of stats()
        self.stat_names = (("loss", "mse", "nll", "t_T", "penalty") if self.gaussian
                           else ("loss", "nelbo_sum", "num_tokens", "ce"))
        self.dev_key = "loss" if self.gaussian else "nelbo_per_token"

    def forward(self, batch: dict):
        ids, noise_mask = batch["input_ids"], batch["noise_mask"]
        if not self.gaussian:
            assert isinstance(self.diffusion, AbsorbingDiffusion)
            return self.diffusion.loss(self.denoiser, ids, noise_mask, batch["attention_mask"],
                                       low_discrepancy=self.cfg.low_discrepancy, weighting=self.cfg.loss_weighting)
        t, w = self.timestep_sampler.sample(ids.shape[0], device=ids.device)
        if self.cfg.simi_penalty == "none":
            out = self.diffusion.loss(self.denoiser, ids, noise_mask, t, w, average=self.cfg.loss_average)
        else:
            out = self.diffusion.post_train_loss(self.denoiser, ids, noise_mask, t, w, simi_lambda=self.cfg.simi_lambda,
                                                 simi_noise=self.cfg.simi_noise, variant=self.cfg.simi_penalty,
                                                 maps=self.cfg.simi_maps, average=self.cfg.loss_average)
        out.t = t
        return out

    def after_backward(self, out, info: dist.DistInfo) -> None:
        """Feed every rank's per-example losses to the lossaware sampler (identical state on all ranks)."""
        if self.gaussian:
            t, losses = dist.all_gather_cat(out.t, info), dist.all_gather_cat(out.per_example.float(), info)
            ok = torch.isfinite(losses)  # a non-finite loss is skipped by the loop; keep it out of the history
            self.timestep_sampler.update(t[ok], losses[ok])

    def stats(self, out) -> torch.Tensor:
        """One micro-batch's statistics [len(stat_names)] float64, summed over micro-batches and ranks."""
        if self.gaussian:
            vals = [out.loss.detach(), out.mse.mean(), out.nll.mean(), out.t_T.mean(), out.penalty.mean()]
        else:
            vals = [out.loss.detach(), out.nelbo.sum(), out.num_tokens, out.ce]
        return torch.stack([v.double() for v in vals])

    def summarise(self, total: torch.Tensor, n_micro: int) -> dict:
        """Logged training metrics from the summed statistics of ``n_micro`` micro-batches."""
        s = dict(zip(self.stat_names, total.tolist()))
        if self.gaussian:
            return {k: v / n_micro for k, v in s.items()}
        return {"loss": s["loss"] / n_micro, "nelbo_per_token": s["nelbo_sum"] / max(s["num_tokens"], 1),
                "ce": s["ce"] / n_micro}

    @torch.no_grad()
    def dev_totals(self, denoiser, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Dev statistics of one batch: absorbing [nelbo sum, noised tokens, words] (Monte Carlo ELBO over
        the K-step grid); gaussian [loss sum, examples, mse sum] of DiffuSeq's loss (also for a post-training
        run) at uniform t (unweighted), averaged as the run's --loss_average says."""
        ids, noise_mask = batch["input_ids"], batch["noise_mask"]
        if self.gaussian:
            t = torch.randint(0, self.cfg.num_steps, (ids.shape[0],), device=ids.device, generator=generator)
            out = self.diffusion.loss(denoiser, ids, noise_mask, t, generator=generator, average=self.cfg.loss_average)
            return torch.stack([out.per_example.double().sum(), torch.tensor(float(ids.shape[0]), dtype=torch.float64,
                                device=ids.device), out.mse.double().sum()])
        nelbo = self.diffusion.nelbo(denoiser, ids, noise_mask, batch["attention_mask"], self.cfg.eval_steps,
                                     monte_carlo=True, generator=generator)
        words = batch["n_words"].sum().double() if "n_words" in batch else torch.zeros((), dtype=torch.float64,
                                                                                       device=ids.device)
        return torch.stack([nelbo.double().sum(), noise_mask.sum().double(), words])

    def dev_metrics(self, tot: torch.Tensor) -> dict:
        if self.gaussian:
            return {"loss": float(tot[0] / tot[1].clamp_min(1)), "mse": float(tot[2] / tot[1].clamp_min(1))}
        per_tok = float(tot[0] / tot[1].clamp_min(1))
        res = {"nelbo_per_token": per_tok, "ppl_token": float(torch.exp(tot[0] / tot[1].clamp_min(1)))}
        if tot[2] > 0:  # seq2seq targets include generated padding: no per-word figure
            res["ppl_word"] = float(torch.exp(tot[0] / tot[2]))
        return res

    def state_dict_extra(self) -> dict:
        return {"timestep_sampler": self.timestep_sampler.state_dict()} if self.gaussian else {}

    def load_state_dict_extra(self, state: dict) -> None:
        if self.gaussian and "timestep_sampler" in state:
            self.timestep_sampler.load_state_dict(state["timestep_sampler"])
