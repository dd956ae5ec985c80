"""Training plumbing: a resumable sharded sampler, the learning-rate schedule, the optimiser, what
``--compile`` needs, RNG state capture, the EMA of the weights, and the signal handler that lets a run
stop cleanly."""
from __future__ import annotations

import contextlib
import math
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from runtime import dist

LR_DECAYS = ("linear", "cosine", "constant")
# warmup: ours (--warmup_steps, then --decay); the other two are DiffusionBERT's, with --warmup_steps as their 10000
LR_SCHEDULES = ("warmup", "ddp_main", "ddp_main_conditional")


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded, reshuffled with ``set_epoch``) that can start mid-epoch, so a
    resumed run sees exactly the examples an uninterrupted run would, on any number of processes.

    Each epoch is one seeded permutation of the data, the same for every world size. ``start`` counts the
    examples of the epoch consumed so far by all ranks together: they are the permutation's first
    ``start``, however many ranks took them. Rank r takes every world-th index of the rest, so the shards
    are disjoint and cover it. When the rest is not a multiple of the world size, it is padded with the
    permutation's first indices so that every rank gets the same number of examples (and of steps): those
    few examples are seen twice in the epoch. With ``start`` 0 this is ``DistributedSampler``'s order."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)  # DistributedSampler's permutation
        perm = torch.randperm(len(self.dataset), generator=g).tolist()
        rest = perm[self.start:]
        pad = -len(rest) % self.num_replicas
        rest += (perm * math.ceil(pad / max(len(perm), 1)))[:pad]
        return iter(rest[self.rank::self.num_replicas])

    def __len__(self):
        return math.ceil(max(len(self.dataset) - self.start, 0) / self.num_replicas)


def lr_lambda(warmup: int, total: int, decay: str, schedule: str = "warmup"):
    """The learning-rate factor of optimizer step n (counted from 0), one of ``LR_SCHEDULES``:

    * ``warmup``: linear warm-up over ``warmup`` steps, then linear/cosine decay to 0 at ``total`` (or constant);
    * ``ddp_main``: DiffusionBERT's ``DDP_main.py`` LambdaLR, ``n / W + 1e-3`` below W, then ``sqrt(W / n)``
      (its ``100 / sqrt(n)`` at W = 10000);
    * ``ddp_main_conditional``: ``DDP_main_conditional.py``'s ``LinearLR(total_iters=W)`` with torch's default
      start factor 1/3: ``1/3 + 2/3 * min(n, W) / W``, constant after W."""
    if schedule == "ddp_main":
        return lambda n: n / warmup + 1e-3 if n < warmup else math.sqrt(warmup / n)
    if schedule == "ddp_main_conditional":
        return lambda n: 1.0 / 3.0 + (2.0 / 3.0) * min(n, warmup) / warmup

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - frac if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def micro_batches(dataset, sampler: ResumableSampler, state, **loader_kw):
    """Endless micro-batches of ``dataset`` from ``state.epoch`` and ``state.position`` (examples of the epoch
    consumed by all ranks together), which it advances as it goes; ``loader_kw`` go to the ``DataLoader``."""
    while True:
        sampler.set_position(state.epoch, state.position)
        # a generator of its own keeps the global RNG untouched (exact resume)
        for batch in DataLoader(dataset, sampler=sampler, generator=torch.Generator(), **loader_kw):
            state.position += batch["input_ids"].shape[0] * sampler.num_replicas  # every rank's is as long
            yield batch
        state.epoch, state.position = state.epoch + 1, 0


class EMA:
    """Exponential moving average of a module's parameters (DiffuSeq evaluates and decodes with it).

    The decay after n updates is min(rate, (1 + n) / (10 + n)): early on the average forgets the random
    initialisation quickly; after about 90k updates it is DiffuSeq's constant 0.9999."""

    def __init__(self, model: torch.nn.Module, rate: float):
        self.model, self.rate, self.updates = model, rate, 0
        self.params = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.rate, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.params, [p.detach() for p in self.model.parameters()], 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def averaged(self):
        """Inside the block the model holds the averages; after it, its own weights again, bit for bit."""
        raw = [p.detach().clone() for p in self.model.parameters()]
        torch._foreach_copy_([p.data for p in self.model.parameters()], self.params)
        try:
            yield self.model
        finally:
            torch._foreach_copy_([p.data for p in self.model.parameters()], raw)

    def state_dict(self) -> dict:
        """The model's state dict with its parameters replaced by their averages (buffers as they are)."""
        state = self.model.state_dict()
        state.update({n: e.clone() for (n, _), e in zip(self.model.named_parameters(), self.params)})
        return state

    def load_state_dict(self, state: dict, updates: int) -> None:
        for (n, _), e in zip(self.model.named_parameters(), self.params):
            e.copy_(state[n])
        self.updates = updates


class StopSignals:
    """SIGINT and SIGTERM set ``flag`` instead of stopping the process, so that the loop can finish its step,
    save ``checkpoints/last`` and exit with 128 + the signal number. ``flag`` is a tensor so that DDP can
    share it: a signal seen by one rank stops every rank. When torchrun sends SIGTERM because another rank
    died, this rank's next collective raises instead (gloo: "Connection closed by peer") and it exits with
    that error; torchrun SIGKILLs one still busy after 30 s."""

    def __init__(self, device: torch.device):
        self.flag = torch.zeros(1, device=device)
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum, frame) -> None:
        self.flag.fill_(signum)

    def received(self, info) -> int:
        """The signal number (0: none) seen by any rank; a collective under DDP."""
        return int(dist.all_reduce_max(self.flag, info).item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def gather_rng_states(info) -> list[dict]:
    """Every rank's RNG state, in rank order. A collective under DDP: every rank must call it."""
    if not info.enabled:
        return [rng_state()]
    states = [None] * info.world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


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


def adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (biases and norms at 0); fused (one kernel per step) on
    CUDA, the default loop elsewhere."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, fused=device.type == "cuda")


def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` (inductor) cannot run on ``device`` here, or None. On the CPU it compiles C++
    with the compiler of ``$CXX`` (default g++); on CUDA it needs triton. Checked before training starts:
    otherwise the first forward fails deep inside torch."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "torch.compile on CUDA needs triton (pip install triton), which is missing"
    import shutil
    try:
        from torch._inductor import cpp_builder
        cpp_builder.get_cpp_compiler()
        return None
    except ImportError:  # another torch layout: look for the compiler ourselves
        import os
        if shutil.which(os.environ.get("CXX", "g++")):
            return None
    except Exception:  # inductor's InvalidCxxCompiler and the like
        pass
    return ("torch.compile on the CPU needs a C++ compiler (g++, or the one named by $CXX) and none was found; "
            "install one or drop --compile")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
