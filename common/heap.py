"""Keep a long run's resident memory flat: give the heap's freed pages back to the system now and then.

glibc's malloc serves a block of 128 kB or more with its own ``mmap`` at first, but each time such a block
is freed it raises that threshold to the block's size (up to 32 MB). After the first steps the activations,
gradients and [N, V] logits of a training or sampling step all come from the heap, in sizes that change
with the number of masked positions; freed blocks fragment the heap and stay resident, so the RSS grows for
hundreds of steps while the memory in use stays flat (docs/results.md, "Memory over long runs").
``malloc_trim(0)`` returns every whole free page to the system. Fixing the threshold instead
(``MALLOC_MMAP_THRESHOLD_``) would keep the heap small too, but maps and faults in every large tensor
afresh, which made training steps much slower on our CPU.
"""
from __future__ import annotations

import ctypes
import sys

_trim = None  # libc.malloc_trim once found; False where there is none


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


class Trimmer:
    """:func:`give_back` at most a ``budget`` fraction of the wall time: :meth:`maybe` (called once per step)
    trims when the time since the last trim is at least the last trim's cost divided by ``budget``. A trim
    that found little to walk is cheap and comes back soon; a dear one (a large fragmented heap) waits longer.
    So a fast step (a GPU's) pays a trim every many steps, never every step, and the overhead stays near
    ``budget`` whatever a step costs. ``clock`` and ``trim`` are for tests."""

    def __init__(self, budget: float = 0.01, clock=None, trim=None):
        import time
        if not 0 < budget < 1:
            raise ValueError(f"budget {budget} is not in (0, 1)")
        self.budget, self.clock, self.trim = budget, clock or time.perf_counter, trim or give_back
        self.next_at = self.clock()  # the first call trims

    def maybe(self) -> bool:
        """Trim if its time has come; returns whether it trimmed."""
        start = self.clock()
        if start < self.next_at:
            return False
        self.trim()
        end = self.clock()
        self.next_at = end + (end - start) / self.budget
        return True
