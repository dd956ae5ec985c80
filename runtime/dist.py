"""Single process or DDP, decided by the ``RANK`` variable that torchrun sets (as nanoGPT does)."""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, *args, **kwargs) -> None:
        """``print`` on rank 0, nothing elsewhere."""
        if self.is_main:
            print(*args, **kwargs)


def env_rank() -> int:
    """This process's rank as torchrun set it (0 when not under torchrun), before any process group exists."""
    return int(os.environ.get("RANK", 0))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1


def pick_device(requested: str | None, flag: str = "--device") -> torch.device:
    """``auto`` (or None): cuda if there is one, else cpu; otherwise the named device, which must exist here
    (one clear error line, not torch's assertion at the first tensor moved to it)."""
    if not requested or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"{flag} {requested}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"{flag} {requested}: this machine has no CUDA device (torch {torch.__version__}, "
                            f"CUDA {'built in' if torch.backends.cuda.is_built() else 'not built in'}); "
                            "use --device cpu or auto")
        if device.index is not None and device.index >= n:
            raise UserError(f"{flag} {requested}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{flag} {requested}: MPS is not available on this machine; use --device cpu or auto")
    elif device.type != "cpu":
        raise UserError(f"{flag} {requested}: only cpu, cuda and mps devices are supported")
    return device


def memory_bytes(device: torch.device) -> int:
    """The total memory of ``device``: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def setup(requested_device: str | None = None) -> DistInfo:
    """Initialise the process group when started by torchrun; otherwise a single process."""
    if "RANK" not in os.environ:
        return DistInfo(device=pick_device(requested_device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(requested_device)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, device)


def cleanup(info: DistInfo) -> None:
    """Destroy the process group, then collect garbage, so that the gloo/NCCL backend (which the last
    reference, e.g. a DDP reducer in a reference cycle, keeps alive) is torn down now, in this thread, and
    not during interpreter shutdown, where a gloo backend can abort the process ("terminate called without
    an active exception", SIGABRT) after all its work is done."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def finish(info: DistInfo) -> None:
    """The normal end of a run on every rank: wait for all ranks (none tears the group down while another
    still communicates with it), then :func:`cleanup`."""
    barrier(info)
    cleanup(info)


@contextlib.contextmanager
def session(requested_device: str | None = None):
    """``with session(args.device) as info:`` -- :func:`setup`, then :func:`finish` when the block ends
    normally, or :func:`cleanup` (no barrier: the other ranks may never reach it) when it raises."""
    info = setup(requested_device)
    try:
        yield info
    except BaseException:
        cleanup(info)
        raise
    finish(info)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate a 1-D tensor from every rank (lengths may differ), in rank order."""
    if not info.enabled:
        return t
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros(m, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


# ---------------------------------------------------------------------------- sharded inference
# predict.py, predict_downstream_condition.py and compute_elbo.py split their batches among ranks
# (batch i goes to rank i mod world_size), seed each batch from (seed, i), and rank 0 merges the
# results in input order: the output is the same for any number of ranks. map_batches does all three.
def batch_seed(seed: int, index: int) -> int:
    """The RNG seed of batch ``index`` of a run seeded with ``seed`` (independent streams per batch)."""
    import numpy as np
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def my_batches(num_batches: int, info: DistInfo) -> range:
    """The batch indices this rank computes."""
    return range(info.rank, num_batches, info.world_size)


def gather_to_main(obj, info: DistInfo) -> list | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, ``None`` on the other ranks (picklable objects)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


@contextlib.contextmanager
def main_first(info: DistInfo):
    """Rank 0 runs the block first (e.g. builds a dataset cache), then the other ranks."""
    if not info.is_main:
        barrier(info)
    yield
    if info.is_main:
        barrier(info)


def broadcast_from_main(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def map_batches(num_batches: int, fn, info: DistInfo, seed: int, on_batch=None, store=None) -> list | None:
    """``[fn(0, g_0), fn(1, g_1), ...]`` over all ``num_batches`` batches, on rank 0; ``None`` on the others.

    Each rank computes its own batches (:func:`my_batches`); batch ``b`` gets a fresh generator on
    ``info.device`` seeded with ``batch_seed(seed, b)``, so its draws depend neither on the number of
    ranks nor on the batches before it. The results (picklable) are gathered to rank 0 and put in batch
    order. ``on_batch(n)``, if given, is called after each computed batch with the number of batches this
    rank has (progress logs). ``store`` (``runtime.outputs.BatchStore``): batches it kept from an earlier,
    interrupted run are taken as they are, and each computed one is saved to it at once.
    """
    kept = store.load() if store is not None else {}
    mine = {}
    for b in my_batches(num_batches, info):
        if b in kept:
            mine[b] = kept[b]
            continue
        gen = torch.Generator(device=info.device).manual_seed(batch_seed(seed, b))
        mine[b] = fn(b, gen)
        if store is not None:
            store.save(b, mine[b])
        if on_batch is not None:
            on_batch(len(mine))
    parts = gather_to_main(mine, info)
    if parts is None:
        return None
    merged = {b: r for part in parts for b, r in part.items()}
    return [merged[b] for b in range(num_batches)]
