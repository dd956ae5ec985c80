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


# In a fresh interpreter: hold a 16 MB, a second 16 MB and a 4 MB block in turn, and print how many blocks
# glibc's own accounting (mallinfo2().hblks) counts as mapped while each is held, over the count after it is
# freed (1: its own mapping; 0: from the heap).
MAPPED_SCRIPT = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from common import heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
fixed = heap.fix_mmap_threshold()
held = []
for size in (16 << 20, 16 << 20, 4 << 20):
    block = libc.malloc(size)
    during = libc.mallinfo2().hblks
    libc.free(block)
    held.append(during - libc.mallinfo2().hblks)
print(fixed, *held)
"""


def mapped_blocks(env: dict) -> list[str]:
    import os
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "DLM_MMAP_THRESHOLD")}
    out = subprocess.run([sys.executable, "-c", MAPPED_SCRIPT, ROOT], capture_output=True, text=True, timeout=60,
                         env={**base, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc on Linux")
@pytest.mark.parametrize("env, expected", [
    # glibc's documented rule (mallopt(3)): a block at or above the threshold (128 kB at first) is mapped, and
    # freeing a mapped block raises the threshold to its size; the second 16 MB and the 4 MB come from the heap
    ({}, ["None", "1", "0", "0"]),
    ({"DLM_MMAP_THRESHOLD": "0"}, ["None", "1", "0", "0"]),
    # fixed at 8 MB: every block of 8 MB or more is mapped, however many were freed; 4 MB is the heap's
    ({"DLM_MMAP_THRESHOLD": str(8 << 20)}, [str(8 << 20), "1", "1", "0"]),
    ({"DLM_MMAP_THRESHOLD": str(2 << 20)}, [str(2 << 20), "1", "1", "1"]),
    # the user's own glibc setting (here 32 MB, above every block) is left as it is
    ({"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}, ["None", "0", "0", "0"]),
])
def test_fixed_mmap_threshold_maps_large_blocks_every_time(env, expected):
    import ctypes
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc 2.33 or later")
    assert mapped_blocks(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"DLM_MMAP_THRESHOLD": "8MB"}, "error: $DLM_MMAP_THRESHOLD='8MB' is not a whole number of bytes"),
    ({"DLM_TRIM_BUDGET": "1.5"}, "error: $DLM_TRIM_BUDGET='1.5' is not a fraction in [0, 1) (0 turns trimming off)"),
    ({"DLM_TRIM_BUDGET": "often"}, "error: $DLM_TRIM_BUDGET='often' is not a fraction in [0, 1) (0 turns trimming off)"),
])
def test_bad_heap_variable_is_one_line(tmp_path, env, message):
    """train.py reads $DLM_MMAP_THRESHOLD and $DLM_TRIM_BUDGET before anything else: a bad value is one error
    line, exit 2, and no run directory."""
    import os
    base = {k: v for k, v in os.environ.items() if k not in ("DLM_MMAP_THRESHOLD", "DLM_TRIM_BUDGET", "DLM_JEMALLOC")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env={**base, **env})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["train.py", "predict.py", "predict_downstream_condition.py", "compute_elbo.py",
                                    "bench.py"])
def test_missing_jemalloc_is_one_line(tmp_path, script):
    """A $DLM_JEMALLOC that names no file stops every script at its start: one error line, exit 2."""
    import os
    env = {**os.environ, "DLM_JEMALLOC": str(tmp_path / "libjemalloc.so.2")}
    env.pop("DLM_MALLOC_REEXEC", None)
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=str(tmp_path), env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: $DLM_JEMALLOC='{tmp_path / 'libjemalloc.so.2'}' is not a file: give the path of "
        "libjemalloc.so.2, or DLM_JEMALLOC=off for glibc's malloc"]
    assert out.stdout == ""


# Prints its pid and arguments, calls prefer_jemalloc, then prints them again with whether the kernel maps the
# stand-in library into this process (/proc/self/maps) and the trim budget the scripts would use.
REEXEC_SCRIPT = r"""
import os, sys
sys.path.insert(0, os.environ["REPO"])
print("start", os.getpid(), sys.argv[1:], flush=True)
from common import heap
heap.prefer_jemalloc()
with open("/proc/self/maps") as f:
    maps = f.read()
print("after", os.getpid(), sys.argv[1:], os.environ["STANDIN"] in maps, heap.trim_budget(0.01), flush=True)
"""


def standin_library(tmp_path) -> str:
    """A copy of this process's libm under a jemalloc-like name: a real shared library that the loader can
    preload, and that no Python process maps by that name unless it was preloaded."""
    import shutil
    with open("/proc/self/maps") as f:
        libm = next(line.split()[-1] for line in f if "/libm.so" in line or "/libm-" in line)
    path = str(tmp_path / "libjemalloc-standin.so")
    shutil.copy(libm, path)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
@pytest.mark.parametrize("setting", ["path", "off", "preloaded"])
def test_prefer_jemalloc_starts_again_once_with_the_library(tmp_path, setting):
    """With $DLM_JEMALLOC naming a library, the script runs again in the same process (same pid, same arguments)
    with it preloaded, and only once; off, or a jemalloc already in LD_PRELOAD, nothing starts again."""
    import os
    lib = standin_library(tmp_path)
    (tmp_path / "probe.py").write_text(REEXEC_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("DLM_MALLOC_REEXEC", "LD_PRELOAD")}
    env.update(REPO=ROOT, STANDIN=lib, DLM_JEMALLOC={"path": lib, "off": "off", "preloaded": lib}[setting])
    if setting == "preloaded":
        env["LD_PRELOAD"] = "/opt/elsewhere/libjemalloc.so.2"  # the user's own: left alone (the loader warns)
    out = subprocess.run([sys.executable, str(tmp_path / "probe.py"), "--flag", "a b"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    pid = lines[0].split()[1]
    if setting == "path":
        assert lines == [f"start {pid} ['--flag', 'a b']"] * 2 + [f"after {pid} ['--flag', 'a b'] True 0.0"]
    else:
        assert lines == [f"start {pid} ['--flag', 'a b']", f"after {pid} ['--flag', 'a b'] False 0.01"]


def test_trimmer_with_no_budget_never_trims():
    from common.heap import Trimmer
    clock = FakeClock(trim_cost=0.1)
    trimmer = Trimmer(0.0, clock=clock, trim=clock.trim)
    for _ in range(100):
        assert not trimmer.maybe()
        clock.now += 1.0
    assert clock.trims == []


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


class FakeClock:
    """A clock that only moves when told: ``advance`` for a step's work, the trim's own cost inside ``trim``."""

    def __init__(self, trim_cost: float):
        self.now, self.trim_cost, self.trims = 0.0, trim_cost, []

    def __call__(self) -> float:
        return self.now

    def trim(self):
        self.trims.append(self.now)
        self.now += self.trim_cost


@pytest.mark.parametrize("step_s, trim_s, budget", [(0.002, 0.1, 0.01), (1.5, 0.2, 0.01), (0.3, 0.05, 0.05)])
def test_trimmer_spends_its_budget_and_no_more(step_s, trim_s, budget):
    """Hand-derived schedule: a trim at time a costing c makes the next wait until a + c + c / budget; steps of
    s seconds then reach it after ceil((c + c / budget) / s) steps, as long as a step is shorter than that."""
    import math

    from common.heap import Trimmer
    clock = FakeClock(trim_s)
    t = Trimmer(budget, clock=clock, trim=clock.trim)
    steps = 3000
    for _ in range(steps):
        t.maybe()
        clock.now += step_s
    gap = trim_s + trim_s / budget  # from one trim's start to the next one's due time
    every = max(1, math.ceil(round((gap - trim_s) / step_s, 9)))  # steps after a trim until it is due
    expected = [0.0]
    while True:
        nxt = expected[-1] + trim_s + every * step_s
        if nxt > clock.now - step_s + 1e-9:
            break
        expected.append(nxt)
    assert clock.trims == pytest.approx(expected)
    spent = len(clock.trims) * trim_s / clock.now
    assert spent <= budget * 1.000001 or len(clock.trims) == 1


def test_trimmer_refuses_a_budget_outside_0_1():
    from common.heap import Trimmer
    for bad in (1, -0.1, 2):
        with pytest.raises(ValueError):
            Trimmer(bad)
