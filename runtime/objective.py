"""The training objective of a run as one ``nn.Module``, so that DDP wraps exactly one forward per
micro-step even when the loss calls the network twice (post-training).

Each process has its own objective, chosen once by :func:`make_objective`: it knows what the loop logs,
what the dev set reports and how to print it, whether the run keeps an EMA of the weights, which part of
the network ``--compile`` compiles, and what state of its own a checkpoint holds."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from diffusion import GaussianDiffusion, make_timestep_sampler, mdlm
from diffusion.autoregressive import Autoregressive
from runtime import dist


class Objective(nn.Module):
    """``forward(batch) -> loss output``; ``denoiser`` is the only submodule (its state dict is the model's)."""
    stat_names: tuple[str, ...] = ()  # the logged training statistics, in the order of stats()
    dev_key = ""  # the dev metric that picks checkpoints/best (lower is better)
    keeps_ema = False  # whether the run keeps (and evaluates with) an EMA of the weights

    def __init__(self, denoiser: nn.Module, diffusion, cfg):
        super().__init__()
        self.denoiser, self.diffusion, self.cfg = denoiser, diffusion, cfg

    def stats(self, out) -> torch.Tensor:
        """One micro-batch's statistics [len(stat_names)] float64, summed over micro-batches and ranks."""
        return torch.stack([v.double() for v in self.stat_values(out)])

    def after_backward(self, out, info: dist.DistInfo) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, dev_loader, ema, info: dist.DistInfo, seed: int, bf16: bool) -> dict:
        """The dev metrics (``dev_totals`` summed over batches and ranks) on the fixed dev subset, with a
        generator seeded afresh each time, and with the EMA weights (``ema``) where the run keeps them."""
        denoiser, device = self.denoiser, info.device
        with ema.averaged() if ema is not None else contextlib.nullcontext():
            denoiser.eval()
            gen = torch.Generator(device=device).manual_seed(seed)
            tot = None
            for batch in dev_loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    part = self.dev_totals(denoiser, batch, gen)
                tot = part if tot is None else tot + part
            dist.all_reduce_sum(tot, info)
        denoiser.train()
        return self.dev_metrics(tot)

    def state_dict_extra(self) -> dict:
        return {}

    def load_state_dict_extra(self, state: dict) -> None:
        pass


class AbsorbingObjective(Objective):
    """DiffusionBERT: the absorbing-diffusion loss; on the dev set, the Monte Carlo NELBO over the K-step grid."""
    stat_names = ("loss", "nelbo_sum", "num_tokens", "ce")
    dev_key = "nelbo_per_token"

    @property
    def compile_target(self) -> nn.Module:
        return self.denoiser.mlm.base_model

    @property
    def dev_description(self) -> str:
        return f"ELBO, K={self.cfg.eval_steps},"

    def forward(self, batch: dict):
        return self.diffusion.loss(self.denoiser, batch["input_ids"], batch["noise_mask"], batch["attention_mask"],
                                   low_discrepancy=self.cfg.low_discrepancy, weighting=self.cfg.loss_weighting)

    def stat_values(self, out) -> list[torch.Tensor]:
        return [out.loss.detach(), out.nelbo.sum(), out.num_tokens, out.ce]

    def summarise(self, total: torch.Tensor, n_micro: int) -> dict:
        """Logged training metrics from the summed statistics of ``n_micro`` micro-batches."""
        s = dict(zip(self.stat_names, total.tolist()))
        return {"loss": s["loss"] / n_micro, "nelbo_per_token": s["nelbo_sum"] / max(s["num_tokens"], 1),
                "ce": s["ce"] / n_micro}

    @torch.no_grad()
    def dev_totals(self, denoiser, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """[nelbo sum, noised tokens, words] of one dev batch."""
        ids, noise_mask = batch["input_ids"], batch["noise_mask"]
        nelbo = self.bound(denoiser, batch, generator)
        words = batch["n_words"].sum().double() if "n_words" in batch else torch.zeros((), dtype=torch.float64,
                                                                                       device=ids.device)
        return torch.stack([nelbo.double().sum(), noise_mask.sum().double(), words])

    def bound(self, denoiser, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """[B] one Monte Carlo draw of each dev example's NELBO: one random step of the K-step grid."""
        return self.diffusion.nelbo(denoiser, batch["input_ids"], batch["noise_mask"], batch["attention_mask"],
                                    self.cfg.eval_steps, monte_carlo=True, generator=generator)

    def dev_metrics(self, tot: torch.Tensor) -> dict:
        per_tok = float(tot[0] / tot[1].clamp_min(1))
        res = {"nelbo_per_token": per_tok, "ppl_token": float(torch.exp(tot[0] / tot[1].clamp_min(1)))}
        if tot[2] > 0:  # seq2seq targets include generated padding: no per-word figure
            res["ppl_word"] = float(torch.exp(tot[0] / tot[2]))
        return res

    def format_dev(self, m: dict) -> str:
        per_word = f"  PPL/word {m['ppl_word']:.2f}" if "ppl_word" in m else ""
        return f"dev NELBO/token {m['nelbo_per_token']:.4f}  PPL/token {m['ppl_token']:.2f}{per_word}"


class MDLMObjective(AbsorbingObjective):
    """MDLM (``--objective mdlm``): the continuous-time loss of ``diffusion/mdlm.py``; on the dev set, its
    continuous-time bound with one stratified draw of t per example (and the exact jump term)."""

    @property
    def dev_description(self) -> str:
        return "continuous-time ELBO, one t per example,"

    def forward(self, batch: dict):
        return mdlm.loss(self.diffusion, self.denoiser, batch["input_ids"], batch["noise_mask"],
                         batch["attention_mask"], low_discrepancy=self.cfg.low_discrepancy)

    def bound(self, denoiser, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return mdlm.nelbo(self.diffusion, denoiser, batch["input_ids"], batch["noise_mask"], batch["attention_mask"],
                          draws=1, generator=generator)


class GaussianObjective(Objective):
    """DiffuSeq's loss at t from the timestep sampler, or Tang et al.'s post-training loss (``--simi_penalty``);
    on the dev set, DiffuSeq's loss at uniform t (unweighted), computed with the EMA weights."""
    stat_names = ("loss", "mse", "nll", "t_T", "penalty")
    dev_key = "loss"
    keeps_ema = True
    dev_description = "loss (EMA weights)"

    def __init__(self, denoiser: nn.Module, diffusion, cfg):
        super().__init__(denoiser, diffusion, cfg)
        self.timestep_sampler = make_timestep_sampler(cfg.timestep_sampler, cfg.num_steps)

    @property
    def compile_target(self) -> nn.Module:
        return self.denoiser.encoder

    def forward(self, batch: dict):
        ids, noise_mask, c = batch["input_ids"], batch["noise_mask"], self.cfg
        t, w = self.timestep_sampler.sample(ids.shape[0], device=ids.device)
        if c.simi_penalty == "none":
            out = self.diffusion.loss(self.denoiser, ids, noise_mask, t, w, average=c.loss_average)
        else:
            out = self.diffusion.post_train_loss(self.denoiser, ids, noise_mask, t, w, simi_lambda=c.simi_lambda,
                                                 simi_noise=c.simi_noise, variant=c.simi_penalty, maps=c.simi_maps,
                                                 average=c.loss_average)
        out.t = t
        return out

    def after_backward(self, out, info: dist.DistInfo) -> None:
        """Feed every rank's per-example losses to the lossaware sampler (identical state on all ranks)."""
        t, losses = dist.all_gather_cat(out.t, info), dist.all_gather_cat(out.per_example.float(), info)
        ok = torch.isfinite(losses)  # a non-finite loss is skipped by the loop; keep it out of the history
        self.timestep_sampler.update(t[ok], losses[ok])

    def stat_values(self, out) -> list[torch.Tensor]:
        return [out.loss.detach(), out.mse.mean(), out.nll.mean(), out.t_T.mean(), out.penalty.mean()]

    def summarise(self, total: torch.Tensor, n_micro: int) -> dict:
        return {k: v / n_micro for k, v in zip(self.stat_names, total.tolist())}

    @torch.no_grad()
    def dev_totals(self, denoiser, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """[loss sum, examples, mse sum] of one dev batch (also for a post-training run: DiffuSeq's loss),
        averaged over positions as the run's --loss_average says."""
        ids, noise_mask = batch["input_ids"], batch["noise_mask"]
        t = torch.randint(0, self.cfg.num_steps, (ids.shape[0],), device=ids.device, generator=generator)
        out = self.diffusion.loss(denoiser, ids, noise_mask, t, generator=generator, average=self.cfg.loss_average)
        return torch.stack([out.per_example.double().sum(), torch.tensor(float(ids.shape[0]), dtype=torch.float64,
                            device=ids.device), out.mse.double().sum()])

    def dev_metrics(self, tot: torch.Tensor) -> dict:
        return {"loss": float(tot[0] / tot[1].clamp_min(1)), "mse": float(tot[2] / tot[1].clamp_min(1))}

    def format_dev(self, m: dict) -> str:
        return f"dev loss (EMA) {m['loss']:.4f}  mse {m['mse']:.4f}"

    def state_dict_extra(self) -> dict:
        return {"timestep_sampler": self.timestep_sampler.state_dict()}

    def load_state_dict_extra(self, state: dict) -> None:
        if "timestep_sampler" in state:
            self.timestep_sampler.load_state_dict(state["timestep_sampler"])


class AutoregressiveObjective(Objective):
    """The AR baseline: next-token cross-entropy (mean over the batch's predicted tokens, the end token included);
    on the dev set, the exact NLL per text wordpiece ([CLS]/[SEP] not counted, as the absorbing NELBO's)."""
    stat_names = ("loss", "nll_sum", "num_tokens")
    dev_key = "nll_per_token"
    dev_description = "exact NLL"

    @property
    def compile_target(self) -> nn.Module:
        return self.denoiser.mlm.base_model

    def network(self, x: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The causal network as the process calls it: logits [N, V] at ``positions`` (no time input)."""
        return self.denoiser(x, None, attention_mask, positions)

    def forward(self, batch: dict):
        out = self.diffusion.loss(self.network, batch["input_ids"], batch["attention_mask"])
        out.num_tokens = batch["noise_mask"].sum()  # the text's wordpieces: what "per token" divides by
        return out

    def stat_values(self, out) -> list[torch.Tensor]:
        return [out.loss.detach(), out.nll.sum(), out.num_tokens]

    def summarise(self, total: torch.Tensor, n_micro: int) -> dict:
        s = dict(zip(self.stat_names, total.tolist()))
        return {"loss": s["loss"] / n_micro, "nll_per_token": s["nll_sum"] / max(s["num_tokens"], 1)}

    @torch.no_grad()
    def dev_totals(self, denoiser, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """[nll sum, text wordpieces, words] of one dev batch (``denoiser``: the weights evaluated)."""
        ids = batch["input_ids"]
        nll = self.diffusion.nll(lambda x, a, p: denoiser(x, None, a, p), ids, batch["attention_mask"])
        words = batch["n_words"].sum().double() if "n_words" in batch else torch.zeros((), dtype=torch.float64,
                                                                                       device=ids.device)
        return torch.stack([nll.double().sum(), batch["noise_mask"].sum().double(), words])

    def dev_metrics(self, tot: torch.Tensor) -> dict:
        per_tok = float(tot[0] / tot[1].clamp_min(1))
        res = {"nll_per_token": per_tok, "ppl_token": float(torch.exp(tot[0] / tot[1].clamp_min(1)))}
        if tot[2] > 0:
            res["ppl_word"] = float(torch.exp(tot[0] / tot[2]))
        return res

    def format_dev(self, m: dict) -> str:
        per_word = f"  PPL/word {m['ppl_word']:.2f}" if "ppl_word" in m else ""
        return f"dev exact NLL/token {m['nll_per_token']:.4f}  PPL/token {m['ppl_token']:.2f}{per_word}"


def make_objective(denoiser: nn.Module, diffusion, cfg) -> Objective:
    """The run's objective: the Gaussian process's, the AR baseline's, or the absorbing one's that ``--objective``
    names."""
    if isinstance(diffusion, GaussianDiffusion):
        return GaussianObjective(denoiser, diffusion, cfg)
    if isinstance(diffusion, Autoregressive):
        return AutoregressiveObjective(denoiser, diffusion, cfg)
    return (MDLMObjective if cfg.objective == "mdlm" else AbsorbingObjective)(denoiser, diffusion, cfg)
