"""Keep a long run's resident memory flat.

Where jemalloc is installed (Debian and Ubuntu: ``libjemalloc2``), the scripts run on it: :func:`prefer_jemalloc`
starts the script again, in the same process, with the library preloaded (``$DLM_JEMALLOC``: its path, or
``off``). jemalloc keeps its size classes apart and returns unused pages on a timer, so a long run's heap does not
fragment (docs/results.md, "jemalloc by default"). Without it the scripts use glibc's malloc, and what follows.

glibc: give the heap's freed pages back to the system now and then.

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
_jemalloc = None  # whether this process runs on jemalloc, once looked up
M_MMAP_THRESHOLD = -3  # glibc's <malloc.h> parameter number for mallopt
MMAP_THRESHOLD = 0  # bytes; 0 keeps glibc's own (dynamic) threshold. 8 MB: above the demo's activations, below its logits
THRESHOLD_ENV = "DLM_MMAP_THRESHOLD"  # bytes; replaces MMAP_THRESHOLD
TRIM_ENV = "DLM_TRIM_BUDGET"  # the Trimmer's share of the wall time in a training run; 0: never trim
JEMALLOC_ENV = "DLM_JEMALLOC"  # a path to libjemalloc; "off" keeps glibc's malloc; unset: the system's, if any
JEMALLOC_OFF = ("off", "0", "no", "none", "glibc")
REEXEC_ENV = "DLM_MALLOC_REEXEC"  # set in the process that prefer_jemalloc started: it never starts another


def mapped(library: str, pid: int | str = "self") -> bool | None:
    """Whether a process has ``library`` (a path or a file name) mapped, from /proc/PID/maps; None where
    /proc cannot tell. The loader only warns when an LD_PRELOAD library is missing."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return os.path.basename(library) in f.read()
    except OSError:
        return None


def jemalloc_off(env=os.environ) -> bool:
    """Whether ``env`` turns jemalloc off: ``$DLM_JEMALLOC`` is one of ``JEMALLOC_OFF``."""
    return env.get(JEMALLOC_ENV, "").strip().lower() in JEMALLOC_OFF


def jemalloc_library() -> str | None:
    """The jemalloc that :func:`prefer_jemalloc` preloads: ``$DLM_JEMALLOC`` if set (a file; one of
    ``JEMALLOC_OFF`` for none), else the system's (``libjemalloc.so.2`` where the loader's cache lists it:
    Debian's and Ubuntu's libjemalloc2, Fedora's jemalloc), else None. A ``$DLM_JEMALLOC`` that names no file is a
    one-line error."""
    from common.errors import UserError
    if jemalloc_off():
        return None
    raw = os.environ.get(JEMALLOC_ENV, "").strip()
    if raw:
        if not os.path.isfile(raw):
            raise UserError(f"${JEMALLOC_ENV}={raw!r} is not a file: give the path of libjemalloc.so.2, or "
                            f"{JEMALLOC_ENV}=off for glibc's malloc")
        return os.path.abspath(raw)
    import ctypes.util
    return ctypes.util.find_library("jemalloc")


def prefer_jemalloc() -> None:
    """Run this script again in the same process (``execve``: the pid, arguments and environment are kept),
    with jemalloc preloaded, where one is installed (:func:`jemalloc_library`) and not loaded already. Call it
    first in a script's ``__main__``, before torch loads.

    Why: glibc's heap fragments over a long run (see above), and at the demo's shape the peak RSS of a training
    run grew 3-14% from step 200 to 2000 (three runs) however it was trimmed. jemalloc serves each size class
    from its own pages and returns unused pages on a timer: over 2,000 steps side by side its peak per 100 steps
    moved -1.3% from step 200 and ended 28% below glibc's (+13.7%), for 3.6% more step time. Sampling on it was
    flat too (+1.7% over 5,000 calls, glibc +5.8%) but 15% slower: it faults the [N, V] logits in afresh at
    every call (docs/results.md, "jemalloc by default"). It must be loaded before the interpreter starts, hence
    the second start. ``DLM_JEMALLOC=off`` keeps glibc's malloc; an ``LD_PRELOAD`` that names a jemalloc
    already is left as it is. Not Linux, or no jemalloc: nothing happens. A bad ``$DLM_JEMALLOC`` is
    one ``error:`` line and exit 2."""
    from common.errors import cli_main
    if not sys.platform.startswith("linux") or os.environ.get(REEXEC_ENV):
        return
    lib = cli_main(jemalloc_library)()  # a bad $DLM_JEMALLOC: one error line, exit 2, as every script's main
    preload = os.environ.get("LD_PRELOAD", "")
    if lib is None or "jemalloc" in preload:
        return
    env = {**os.environ, "LD_PRELOAD": " ".join(p for p in (lib, preload) if p), REEXEC_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, getattr(sys, "orig_argv", [sys.executable, *sys.argv]), env)
    except OSError:  # cannot start again: go on with glibc's malloc
        return


def jemalloc_in_use() -> bool:
    """Whether this process's malloc is jemalloc (a library of that name is mapped)."""
    global _jemalloc
    if _jemalloc is None:
        _jemalloc = bool(mapped("jemalloc"))
    return _jemalloc


def malloc_name() -> str:
    """``jemalloc`` or ``glibc`` (what a log line says runs this process's heap)."""
    return "jemalloc" if jemalloc_in_use() else "glibc"


def give_back() -> bool:
    """``malloc_trim(0)`` on glibc (Linux): the free pages of every malloc arena go back to the system; what
    is in use is untouched, and a page used again is faulted back in. Costs a walk of the free lists. A
    no-op elsewhere (macOS, musl). Returns whether memory was released."""
    global _trim
    if not sys.platform.startswith("linux") or jemalloc_in_use():  # jemalloc returns its pages on its own
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
    if nbytes <= 0 or jemalloc_in_use():  # glibc's mallopt does not reach jemalloc's heap
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    return nbytes if mallopt(M_MMAP_THRESHOLD, nbytes) == 1 else None


def trim_budget(default: float) -> float:
    """The training loop's trim budget: ``$DLM_TRIM_BUDGET`` if set (a fraction in [0, 1); 0 turns trimming
    off), else ``default``, or 0 under jemalloc (:func:`give_back` has nothing to trim there). A bad value is a
    one-line error."""
    from common.errors import UserError
    raw = os.environ.get(TRIM_ENV, "").strip()
    if not raw:
        return 0.0 if jemalloc_in_use() else default
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
