"""Test hooks that inject failures, switched on by environment variables (tests/test_faults.py and
tests/test_ddp_faults.py use them; a normal run sets none and nothing changes):

    DLM_FAULT_NAN_STEPS=3,4      make the loss NaN at these (1-based) optimizer steps
    DLM_FAULT_RAISE_STEP=3       raise a RuntimeError at the start of this step
    DLM_FAULT_RANK=1             restrict the two above to this rank (default: every rank)
    DLM_FAULT_CRASH_IN_SAVE=1    die (exit status 99) half-way through writing a checkpoint
    DLM_FAULT_DISK_FULL_IN_SAVE=1  a full disk half-way through writing a checkpoint: OSError(ENOSPC)
    DLM_FAULT_SIGNAL_AFTER_BATCHES=2   predict.py, compute_elbo.py and the decoder send themselves a signal
                                 once they have saved this many batches (tests/test_outputs.py)
    DLM_FAULT_SIGNAL=TERM        which signal: INT (the default, as Ctrl-C), TERM, or STOP (the process
                                 pauses, holding its lock, until a SIGCONT)
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    """The step hooks of one rank, read once from the environment when the loop starts."""
    rank: int = 0
    nan_steps: frozenset = frozenset()
    raise_step: int = 0  # 0: never (steps count from 1)

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        mine = os.environ.get("DLM_FAULT_RANK", str(rank)) == str(rank)
        if not mine:
            return cls(rank)
        nan = frozenset(int(x) for x in os.environ.get("DLM_FAULT_NAN_STEPS", "").split(",") if x.strip())
        return cls(rank, nan, int(os.environ.get("DLM_FAULT_RAISE_STEP", "0")))

    def before_step(self, step: int) -> None:
        if step == self.raise_step:
            raise RuntimeError(f"DLM_FAULT_RAISE_STEP: injected failure at step {step} on rank {self.rank}")

    def poison_loss(self, out, step: int) -> None:
        """Make ``out.loss`` NaN at the chosen steps (before the backward pass, as a real overflow would)."""
        if step in self.nan_steps:
            out.loss = out.loss * float("nan")


def crash_in_save() -> None:
    """Checked on every save, after the weights are written: leave a half-written checkpoint behind."""
    if os.environ.get("DLM_FAULT_CRASH_IN_SAVE"):
        os._exit(99)


def disk_full_in_save(path: str) -> None:
    """Checked on every save, after the weights are written: the next write fails as on a full disk."""
    if os.environ.get("DLM_FAULT_DISK_FULL_IN_SAVE"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def signal_after_batches(saved: int) -> None:
    """Called after each batch an inference script saves (``saved`` so far in this process): a real signal,
    delivered by the kernel at a known point, as Ctrl-C or ``kill`` would deliver it at a random one."""
    if str(saved) == os.environ.get("DLM_FAULT_SIGNAL_AFTER_BATCHES", "").strip():
        import signal
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("DLM_FAULT_SIGNAL", "INT").upper()))
