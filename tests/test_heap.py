"""common.heap.give_back against the kernel's count of resident pages: blocks freed in the middle of glibc's
heap stay resident after free() (the RSS growth of a long run), and malloc_trim gives them back."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

# In a fresh interpreter (this process's heap is in an unknown state): raise glibc's mmap threshold as a
# training step does (free a 16 MB mapped block), fill 48 blocks of 1 MB from the heap, free all but the
# last (it pins the top, so free() cannot shrink the heap), then trim. Prints the RSS in kB at each stage.
SCRIPT = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from common import heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
libc.free(libc.malloc(16 << 20))
blocks = [libc.malloc(1 << 20) for _ in range(48)]
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
filled = rss()
for b in blocks[:-1]:
    libc.free(b)
freed = rss()
print(filled, freed, heap.give_back(), rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc on Linux")
def test_freed_heap_blocks_stay_resident_until_given_back():
    out = subprocess.run([sys.executable, "-c", SCRIPT, ROOT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    filled, freed, released, trimmed = out.stdout.split()
    filled, freed, trimmed = int(filled), int(freed), int(trimmed)
    assert filled - freed < 4 << 10  # 47 MB freed, under 4 MB of it returned: free() keeps the pages
    assert released == "True" and freed - trimmed > 40 << 10  # malloc_trim returns (almost) all 47 MB


def test_training_plots_leave_no_cyclic_garbage(tmp_path):
    """train.py redraws its plots at every evaluation; their figures are reference cycles that only a full
    collection frees (thousands of objects a drawing waited, and the heap grew by them): gc's own count of
    unreachable objects after a drawing is the oracle."""
    import gc
    import json

    from evaluation import plots
    rows = [{"step": s, "split": "train", "loss": 5.0 / s} for s in range(1, 41)]
    rows += [{"step": s, "split": "dev", "nelbo_per_token": 3.0 / s, "ppl_token": 20.0 / s} for s in (10, 20, 30, 40)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plots.draw_training_plots(str(tmp_path))  # matplotlib's imports and caches
    gc.collect()
    assert len(plots.draw_training_plots(str(tmp_path))) == 2
    assert gc.collect() < 200  # without the collection in draw_training_plots: about 6,000 here
