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
