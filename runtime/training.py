"""Training plumbing: a resumable sharded sampler, the learning-rate schedule, RNG state capture."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded, reshuffled with ``set_epoch``) that can start mid-epoch, so a
    resumed run sees exactly the examples an uninterrupted run would.

    Rank r takes every world-th index of one shuffled permutation, so the shards are disjoint and cover
    the data. When the size is not a multiple of the world size, the permutation is padded with its own
    first indices so that every rank gets the same number of examples (and of steps): those few examples
    are seen twice in the epoch. ``start`` counts examples of this rank's shard, the same on every rank."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


def lr_lambda(warmup: int, total: int, decay: str):
    """Linear warm-up over ``warmup`` steps, then linear/cosine decay to 0 at ``total`` (or constant)."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - frac if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
