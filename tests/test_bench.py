"""bench.py end to end at a tiny shape (--quick): it runs every measurement and the JSON holds the ratios
docs/results.md reports; training is timed in train mode and sampling in eval mode. (That the dense
reference computes the same loss as the fast path is tests/test_reference_loss.py.)"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from common.errors import UserError
from conftest import run_cli


def test_bench_absorbing_quick(tmp_path, tiny_bert):
    out = tmp_path / "bench.json"
    proc = run_cli("bench.py", "--quick", "--model", tiny_bert, "--batch_size", "2", "--seq_len", "12",
                   "--num_steps", "64", "--lengths", "8,12", "--step_grid", "4,8", "--reference", "--json", str(out),
                   cwd=str(tmp_path))
    r = json.load(open(out))
    assert r["kl_fast_vs_dense_rel_diff"] < 1e-4  # reported with --reference; the equality is tested elsewhere
    for k in ("floor", "ours", "full_projection", "mdlm", "reference"):
        assert r["train"][k] > 0
    s = r["sample"]
    assert s["cache_off"]["calls"] == 8 and s["cache_on"]["calls"] <= 8
    # with the cache a sequence is never evaluated more often than it has positions to reveal (+1)
    assert s["cache_on"]["rows_per_sequence"] <= s["cache_on"]["positions_per_sequence"] + 1
    assert s["reference"]["seconds_per_iteration"] > 0
    assert set(r["by_length"]) == {"8", "12"} and set(r["by_steps"]) == {"4", "8"}
    assert r["by_steps"]["8"]["cache_off_calls"] == 8
    assert all(v is None or v > 0 for v in r["memory_mb"].values())
    assert "step / floor" in proc.stdout and "reference / ours" in proc.stdout and "MDLM / ours" in proc.stdout


def test_bench_gaussian_quick(tmp_path, tiny_bert):
    out = tmp_path / "g.json"
    run_cli("bench.py", "--quick", "--process", "gaussian", "--model", tiny_bert, "--batch_size", "2",
            "--seq_len", "12", "--num_steps", "40", "--emb_dim", "8", "--hidden_size", "16", "--num_layers", "1",
            "--num_heads", "2", "--json", str(out), cwd=str(tmp_path))
    r = json.load(open(out))
    assert r["decode_adp_20"]["calls"] == 20
    assert math.isfinite(r["reverse"]["ratio"]) and r["reverse"]["ratio"] > 0
    assert r["train"]["ours"] > 0 and r["train"]["floor"] > 0
    t = r["throughput"]  # on the CPU: no peak, so no MFU
    assert math.isclose(t["train_steps_per_s"], 1 / r["train"]["ours"]) and t["mfu"] is None
    assert math.isclose(t["train_tokens_per_s"], 2 * 12 / r["train"]["ours"])


def test_bench_rejects_bad_flags(tmp_path):
    proc = run_cli("bench.py", "--lengths", "a,b", cwd=str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --lengths and --step_grid are comma-separated integers"]


def test_bench_times_training_in_train_mode_and_sampling_in_eval_mode(tiny_bert):
    """train.py trains with dropout on; from_pretrained returns the model in eval mode, so the bench must
    switch modes itself: every dropout layer the training measurements run is in train mode, every one the
    sampling and scaling forwards run (no grad) is in eval mode."""
    import bench

    args = bench.parse_args(["--quick", "--model", tiny_bert, "--batch_size", "2", "--seq_len", "8",
                             "--num_steps", "16", "--lengths", "8", "--step_grid", "4", "--reference"])
    device = torch.device("cpu")
    ab = bench.Absorbing(args, device, bench.Clock(device), lambda: torch.autocast("cpu", enabled=False))
    assert ab.denoiser.mlm.config.hidden_dropout_prob > 0
    seen = []  # (grad enabled, module in train mode) at every dropout call
    for m in ab.denoiser.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda mod, i, o: seen.append((torch.is_grad_enabled(), mod.training)))
    ab.denoiser.eval()  # as from_pretrained leaves it
    bench.absorbing_training(ab)
    assert seen and all(training for _, training in seen)
    seen.clear()
    bench.absorbing_sampling(ab)
    assert seen and not any(training for _, training in seen)
    seen.clear()
    bench.absorbing_scaling(ab)
    assert {(True, True), (False, False)} == set(seen)  # train steps in train mode, no-grad calls in eval mode


def test_throughput_and_mfu_by_hand():
    """6 N + 12 layers * hidden * seq_len FLOPs per trained token, against the card's peak by name."""
    from types import SimpleNamespace

    from bench import peak_tflops, throughput
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0, "NVIDIA H200": 989.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A10G": 70.0, "NVIDIA A10": 125.0, "NVIDIA L4": 121.0,
             "NVIDIA L40S": 362.0, "Tesla T4": 65.0, "Some Future GPU": None}
    assert {n: peak_tflops(n) for n in names} == names
    r = {"train": {"ours": 0.5}, "parameters": 1000, "layers": 2, "hidden": 8,
         "sample": {"cache_on": {"seconds": 2.0}, "steps": 16}, "memory_mb": {"train": 10.0, "sample": None}}
    args = SimpleNamespace(batch_size=4, seq_len=16, process="absorbing")
    t = throughput(r, args, {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda"})
    flops = (6 * 1000 + 12 * 2 * 8 * 16) * 64 / 0.5  # 9072 per token, 64 tokens a step, 2 steps/s
    assert t["train_steps_per_s"] == 2.0 and t["train_tokens_per_s"] == 128.0
    assert math.isclose(t["model_tflops"], flops / 1e12) and math.isclose(t["mfu"], flops / 1e12 / 989.0)
    assert t["sample_sequences_per_s"] == 2.0 and t["peak_memory_mb"] == 10.0
    assert throughput(r, args, {"device": "x86_64", "device_type": "cpu"})["mfu"] is None


# ---- the memory benchmark (--memory): its bookkeeping, checked on hand-made records and a known allocation
def test_growth_is_measured_from_the_first_record_after_the_warm_up():
    import bench

    recs = [{"step": 100, "rss_mb": 500.0}, {"step": 200, "rss_mb": 800.0}, {"step": 300, "rss_mb": 840.0},
            {"step": 400, "rss_mb": 820.0}]
    g = bench.growth(recs, 200)
    # by hand: base 800 (step 200), end 820 -> +2.5%; highest 840 -> +5%
    assert (g["from_step"], g["to_step"], g["base_mb"], g["end_mb"], g["max_mb"]) == (200, 400, 800.0, 820.0, 840.0)
    assert g["growth"] == pytest.approx(0.025) and g["max_growth"] == pytest.approx(0.05)
    assert bench.growth(recs, 150)["from_step"] == 200  # no record at 150: the next one is the base
    assert bench.growth(recs, 500)["growth"] is None
    assert bench.growth([{"step": 200, "rss_mb": None}, *recs[2:]], 200)["base_mb"] == 840.0  # unreadable skipped


def test_new_records_leaves_a_line_being_written_for_the_next_poll(tmp_path):
    import bench

    path = tmp_path / "metrics.jsonl"
    assert bench.new_records(str(path), 0) == ([], 0)  # not written yet
    path.write_text('{"step": 10, "split": "train"}\n{"step": 20, "sp')
    recs, offset = bench.new_records(str(path), 0)
    assert recs == [{"step": 10, "split": "train"}] and offset == len('{"step": 10, "split": "train"}\n')
    with open(path, "a") as f:
        f.write('lit": "dev"}\n')
    assert bench.new_records(str(path), offset)[0] == [{"step": 20, "split": "dev"}]


RSS_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import bench
before = bench.rss_mb()
bench.reset_peak_rss()
block = torch.ones(64 * 2**20 // 4)  # 64 MB, every page written
during = bench.rss_mb()
assert during - before > 48, (before, during)  # resident: at least most of the 64 MB
del block
# the peak of the window holds the block (the kernel syncs its counters lazily: a few pages may lag)
assert bench.rss_mb("self", "VmHWM") > during - 4
bench.reset_peak_rss()
assert bench.rss_mb("self", "VmHWM") < during - 32  # a new window starts at the current RSS, the block freed
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux /proc")
def test_rss_mb_sees_a_known_allocation_and_the_peak_window_resets():
    # in a fresh interpreter: inside the suite, freed memory that the allocator keeps can serve the block unseen
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", RSS_CHILD, root], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_memory_flags_are_checked(tmp_path):
    import bench

    with pytest.raises(UserError, match="--memory sample needs --checkpoint"):
        bench.parse_args(["--memory", "sample"])
    with pytest.raises(UserError, match="no such directory"):
        bench.parse_args(["--memory", "both", "--checkpoint", str(tmp_path / "nope")])
    with pytest.raises(UserError, match="--memory_every must be at least 1"):
        bench.parse_args(["--memory", "train", "--memory_every", "0"])
    assert bench.parse_args([]).batch_size == 8 and bench.parse_args(["--memory", "train"]).batch_size is None
    with pytest.raises(UserError, match="--memory_heap takes distinct settings"):
        bench.parse_args(["--memory", "train", "--memory_heap", "default,default"])
    with pytest.raises(UserError, match="--memory_heap takes distinct settings"):
        bench.parse_args(["--memory", "train", "--memory_heap", "tcmalloc"])
    with pytest.raises(UserError, match="sampling runs in this process"):
        bench.parse_args(["--memory", "both", "--memory_heap", "default,notrim", "--checkpoint", str(tmp_path)])
    assert bench.parse_args(["--memory", "train", "--memory_heap", "default, fixed"]).memory_heap == ["default", "fixed"]
    with pytest.raises(UserError, match="sampling has none to turn off"):
        bench.parse_args(["--memory", "sample", "--memory_heap", "notrim", "--checkpoint", str(tmp_path)])


def test_sampling_refuses_a_malloc_this_process_does_not_have(tmp_path):
    """Sampling runs in bench.py's own process: a --memory_heap that needs the other malloc is refused in one line
    naming the variable to set (this test process was not started on jemalloc unless LD_PRELOAD says so)."""
    import os

    import bench
    from common.errors import UserError

    on_jemalloc = "jemalloc" in os.environ.get("LD_PRELOAD", "")
    wrong = "glibc" if on_jemalloc else "jemalloc"
    with pytest.raises(UserError, match="run bench.py with DLM_JEMALLOC=" + ("off" if on_jemalloc else "<path")):
        bench.parse_args(["--memory", "sample", "--memory_heap", wrong, "--checkpoint", str(tmp_path)])
    right = "jemalloc" if on_jemalloc else "glibc"
    assert bench.parse_args(["--memory", "sample", "--memory_heap", right, "--checkpoint", str(tmp_path)]).memory_heap \
        == [right]


def test_heap_arm_environments_by_hand():
    """What each --memory_heap setting gives a training child, from a parent that runs on a jemalloc it preloaded
    beside another library of the user's: the glibc settings drop the jemalloc (and only it) and turn it off."""
    import bench

    parent = {"PATH": "/bin", "LD_PRELOAD": "/x/libjemalloc.so.2 /y/libfoo.so", "DLM_MALLOC_REEXEC": "1",
              "DLM_JEMALLOC": "/x/libjemalloc.so.2"}
    glibc = {"PATH": "/bin", "LD_PRELOAD": "/y/libfoo.so", "DLM_JEMALLOC": "off"}
    assert bench.arm_env("default", parent) == parent
    assert bench.arm_env("jemalloc", parent) == parent
    assert bench.arm_env("glibc", parent) == {**glibc, "DLM_MMAP_THRESHOLD": "0"}
    assert bench.arm_env("fixed", parent) == {**glibc, "DLM_MMAP_THRESHOLD": "8388608"}
    assert bench.arm_env("notrim", parent) == {**glibc, "DLM_TRIM_BUDGET": "0"}
    # a parent on glibc by choice: the jemalloc setting lets the child find the system's; no LD_PRELOAD is made up
    assert bench.arm_env("jemalloc", {"PATH": "/bin", "DLM_JEMALLOC": "off"}) == {"PATH": "/bin"}
    assert bench.arm_env("glibc", {"PATH": "/bin", "LD_PRELOAD": "/x/libjemalloc.so.2"}) == \
        {"PATH": "/bin", "DLM_JEMALLOC": "off", "DLM_MMAP_THRESHOLD": "0"}


def test_step_time_ratio_by_hand():
    """Arm b logs 1.1x arm a's tokens/s in every window but the first (ending at step 10) and those after an
    evaluation (ending at 110 and 210), which are left out; so every kept ratio, hence the median and both
    quartiles, is 1.1. A step only one arm logged is skipped."""
    import bench

    a = {s: 100.0 for s in range(10, 310, 10)}
    b = {s: 110.0 for s in range(10, 300, 10)}  # no step 300
    b[10], b[110], b[210] = 5.0, 1000.0, 2000.0
    r = bench.step_time_ratio(a, b)
    assert r["windows"] == 29 - 3
    assert r["median"] == pytest.approx(1.1) and r["q1"] == pytest.approx(1.1) and r["q3"] == pytest.approx(1.1)
    assert bench.step_time_ratio({10: 1.0, 20: 1.0}, {10: 1.0, 20: 1.0}) is None  # too few windows


def test_cpu_counts_agree_with_getrusage():
    """/proc/self/stat's minor faults and CPU seconds against the kernel's other report of them, getrusage, read
    just before and just after (CPU time in clock ticks: 10 ms of slack)."""
    import resource

    import bench

    import mmap

    block = mmap.mmap(-1, 32 << 20)  # a fresh anonymous mapping (a heap block could reuse resident pages)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        block.madvise(mmap.MADV_NOHUGEPAGE)  # 4 kB pages, a fault each, even where huge pages are on always
    before = resource.getrusage(resource.RUSAGE_SELF)
    for page in range(0, 32 << 20, mmap.PAGESIZE):
        block[page] = 1  # one write a page: each faults one in
    c = bench.cpu_counts()
    after = resource.getrusage(resource.RUSAGE_SELF)
    block.close()
    assert before.ru_minflt + (32 << 20) // mmap.PAGESIZE // 2 <= c["minor_faults"] <= after.ru_minflt
    assert before.ru_utime - 0.01 <= c["user_s"] <= after.ru_utime + 0.01
    assert before.ru_stime - 0.01 <= c["system_s"] <= after.ru_stime + 0.01
