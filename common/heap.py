"""Keep a long run's resident memory flat: give the heap's freed pages back to the system now and then.

glibc's malloc serves a block of 128 kB or more with its own ``mmap`` at first, but each time such a block
is freed it raises that threshold to the block's size (up to 32 MB). After the first steps the activations,
gradients and [N, V] logits of a training or sampling step all come from the heap, in sizes that change
with the number of masked positions; freed blocks fragment the heap and stay resident, so the RSS grows for
hundreds of steps while the memory in use stays flat (docs/results.md, "Memory over long runs").
``malloc_trim(0)`` returns every whole free page to the system.

A trim cannot move blocks, so what it leaves is the fragmented rest. :func:`fix_mmap_threshold` can take
the largest blocks off the heap: at a fixed threshold (``$DLM_MMAP_THRESHOLD``, bytes) every block that size
or more is mapped and unmapped on its own, and glibc no longer raises the threshold. glibc raises it only up
to 32 MB, so blocks above that (the [N, 30522] logits of more than about 275 masked positions) are mapped
whatever the setting; at 8 MB the logits of fewer positions, whose size changes every step, leave the heap
too, and the activations stay on it. Measured side by side at the demo's shape (docs/results.md, "At the
demo's own shape"), it lowered the peak RSS of a 2,000-step training run by about 6% but made steps 7% slower (every mapped block
is faulted in afresh), and the RSS still crept up after step 200: the activations, whose sizes change with
each batch's longest row and masked count, fragment the heap too. So it is off by default (glibc's own
threshold), an option for a run short of memory. A threshold as low as glibc's starting 128 kB mapped every
activation afresh and was much slower. train.py, predict.py, the decoder and compute_elbo.py call
:func:`fix_mmap_threshold` at start-up, before a model loads.
"""
from __future__ import annotations

import ctypes
import os
import sys

_trim = None  # libc.malloc_trim once found; False where there is none
M_MMAP_THRESHOLD = -3  # glibc's <malloc.h> parameter number for mallopt
MMAP_THRESHOLD = 0  # bytes; 0 keeps glibc's own (dynamic) threshold. 8 MB: above the demo's activations, below its logits
THRESHOLD_ENV = "DLM_MMAP_THRESHOLD"  # bytes; replaces MMAP_THRESHOLD
TRIM_ENV = "DLM_TRIM_BUDGET"  # the Trimmer's share of the wall time in a training run; 0: never trim


def give_back() -> bool:
    """``malloc_trim(0)`` on glibc (Linux): the free pages of every malloc arena go back to the system; what
    is in use is untouched, and a page used again is faulted back in. Costs a walk of the free lists. A
    no-op elsewhere (macOS, musl). Returns whether memory was released."""
    global _trim
    if not sys.platform.startswith("linux"):
        return False
    if _trim is None:
        try:
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _trim = False
    return bool(_trim and _trim(0))


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> int | None:
    """Fix glibc's mmap threshold at ``nbytes`` (``mallopt(M_MMAP_THRESHOLD)``): every later block of that
    size or more gets its own mapping, returned to the system when freed, and glibc stops raising the threshold
    as blocks are freed. ``$DLM_MMAP_THRESHOLD`` (bytes) replaces ``nbytes``; 0 leaves glibc's default. A
    ``MALLOC_MMAP_THRESHOLD_`` in the environment is the user's own setting, which glibc has already applied:
    it is left alone. Returns the threshold set, or None where nothing was set (those cases, or not glibc). A
    bad ``$DLM_MMAP_THRESHOLD`` is a one-line error."""
    from common.errors import UserError
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return None
    raw = os.environ.get(THRESHOLD_ENV, "").strip()
    if raw:
        try:
            nbytes = int(raw)
        except ValueError:
            raise UserError(f"${THRESHOLD_ENV}={raw!r} is not a whole number of bytes") from None
    if nbytes <= 0:
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    return nbytes if mallopt(M_MMAP_THRESHOLD, nbytes) == 1 else None


def trim_budget(default: float) -> float:
    """The training loop's trim budget: ``$DLM_TRIM_BUDGET`` if set (a fraction in [0, 1); 0 turns trimming
    off), else ``default``. A bad value is a one-line error."""
    from common.errors import UserError
    raw = os.environ.get(TRIM_ENV, "").strip()
    if not raw:
        return default
    try:
        budget = float(raw)
    except ValueError:
        budget = -1.0
    if not 0 <= budget < 1:
        raise UserError(f"${TRIM_ENV}={raw!r} is not a fraction in [0, 1) (0 turns trimming off)")
    return budget


class Trimmer:
    """:func:`give_back` at most a ``budget`` fraction of the wall time: :meth:`maybe` (called once per step)
    trims when the time since the last trim is at least the last trim's cost divided by ``budget``. A trim
    that found little to walk is cheap and comes back soon; a dear one (a large fragmented heap) waits longer.
    So a fast step (a GPU's) pays a trim every many steps, never every step, and the trims' own time stays near
    ``budget`` whatever a step costs; a budget of 0 never trims. The budget counts the trim's own time, not
    the page faults that bring the returned pages back when the next step uses them again: at the demo's
    shape on a CPU those made steps 9% slower in all, for a peak RSS 17% lower (docs/results.md, "What the
    trims cost"). ``clock`` and ``trim`` are for tests."""

    def __init__(self, budget: float = 0.01, clock=None, trim=None):
        import time
        if not 0 <= budget < 1:
            raise ValueError(f"budget {budget} is not in [0, 1)")
        self.budget, self.clock, self.trim = budget, clock or time.perf_counter, trim or give_back
        self.next_at = self.clock()  # the first call trims

    def maybe(self) -> bool:
        """Trim if its time has come; returns whether it trimmed."""
        if not self.budget:
            return False
        start = self.clock()
        if start < self.next_at:
            return False
        self.trim()
        end = self.clock()
        self.next_at = end + (end - start) / self.budget
        return True
