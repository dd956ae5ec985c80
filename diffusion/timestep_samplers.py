"""Training-time samplers of t for the Gaussian process (Nichol & Dhariwal 2021, §3.3; DiffuSeq).

``sample(B)`` returns ``t`` [B] long and importance weights [B] float, so that the weighted loss
``mean(w * loss(t))`` is an unbiased estimate of the uniform-t loss. ``update(t, losses)`` feeds
the per-example losses back (all ranks' losses under DDP). Both are tensors-only, no per-example
Python loops; the state is a plain dict of tensors for exact resumption.
"""
from __future__ import annotations

import torch


class UniformSampler:
    name = "uniform"

    def __init__(self, num_steps: int):
        self.num_steps = num_steps

    def probs(self) -> torch.Tensor:
        return torch.full((self.num_steps,), 1.0 / self.num_steps, dtype=torch.float64)

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        t = torch.randint(0, self.num_steps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossAwareSampler(UniformSampler):
    """``lossaware``: ``p_t ∝ sqrt(E[loss_t^2])`` over the last ``history`` losses seen at each t,
    mixed with ``uniform_prob`` of the uniform distribution; uniform until every t has a full history.
    """
    name = "lossaware"

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_steps)
        self.history, self.uniform_prob = history, uniform_prob
        self.losses = torch.zeros(num_steps, history, dtype=torch.float64)  # ring buffer per t
        self.count = torch.zeros(num_steps, dtype=torch.long)               # losses written so far per t

    def warmed_up(self) -> bool:
        return bool((self.count >= self.history).all())

    def probs(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().probs()
        w = self.losses.pow(2).mean(-1).sqrt()
        p = w / w.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_steps

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        p = self.probs()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.multinomial(p.to(gen_device), batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_steps * p[t.cpu()])
        return t.to(device), weights.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Write ``losses`` [N] observed at steps ``t`` [N] into the history (in order, oldest dropped)."""
        t, losses = t.detach().long().cpu(), losses.detach().double().cpu()
        if t.numel() == 0:
            return
        # rank of each occurrence among the batch's entries with the same t (stable order)
        order = torch.sort(t, stable=True).indices
        t_sorted = t[order]
        first = torch.searchsorted(t_sorted, t_sorted, right=False)
        rank = torch.empty_like(t)
        rank[order] = torch.arange(t.numel()) - first
        n_t = torch.bincount(t, minlength=self.num_steps)
        keep = rank >= n_t[t] - self.history  # only the last `history` occurrences of each t matter
        slot = (self.count[t] + rank) % self.history
        self.losses[t[keep], slot[keep]] = losses[keep]
        self.count += n_t

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"])
        self.count.copy_(state["count"])


TIMESTEP_SAMPLERS = {"uniform": UniformSampler, "lossaware": LossAwareSampler}


def make_timestep_sampler(name: str, num_steps: int) -> UniformSampler:
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}")
    return TIMESTEP_SAMPLERS[name](num_steps)
