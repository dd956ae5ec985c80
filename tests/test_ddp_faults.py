"""DDP under faults, on the CPU (gloo): the sampler gives every rank a disjoint shard; a NaN loss on one
rank skips the update on every rank; only rank 0 writes; a failure on one rank ends the whole job
promptly with its message shown; a run resumed on another number of processes consumes the examples
that the uninterrupted run does, step by step. Short torchrun runs of the tiny DiffuSeq model."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import ROOT, cli_env, run_cli, run_together
from safetensors.torch import load_file
from test_faults import args, ckpt_step

from runtime.training import ResumableSampler

# Runs train.py and saves, at exit, what only each rank knows: its own weights (rank 1 writes no
# checkpoint) and the loss of each of its micro-batches.
PROBE = '''
import os, runpy, sys, torch
from runtime.objective import Objective
nets, losses = [], []
init, stats = torch.nn.parallel.DistributedDataParallel.__init__, Objective.stats
def record_net(self, module, *a, **k):
    nets.append(module)
    init(self, module, *a, **k)
def record_loss(self, out):
    losses.append(out.loss.item())
    return stats(self, out)
torch.nn.parallel.DistributedDataParallel.__init__, Objective.stats = record_net, record_loss
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    torch.save({"weights": nets[0].denoiser.state_dict(), "losses": losses},
               os.path.join(os.environ["PROBE_DIR"], f"rank{os.environ['RANK']}.pt"))
'''


def shards(n: int, epoch: int = 0, start: int = 0) -> list[list[int]]:
    samplers = [ResumableSampler(range(n), num_replicas=2, rank=r, seed=0) for r in range(2)]
    for s in samplers:
        s.set_position(epoch, start)
    return [list(s) for s in samplers]


def test_sampler_gives_disjoint_shards_reshuffled_per_epoch():
    n = 40
    a, b = shards(n)
    assert len(a) == len(b) == n // 2 and not set(a) & set(b) and sorted(a + b) == list(range(n))
    a1, b1 = shards(n, epoch=1)
    assert not set(a1) & set(b1) and sorted(a1 + b1) == list(range(n))
    assert a1 != a and set(a1) != set(a)  # set_epoch reshuffles, across ranks too
    assert shards(n, epoch=1) == [a1, b1]  # and is the same on every call (exact resume)
    # a resumed run starts after the examples all ranks consumed (5 each): the rest of the epoch stays disjoint
    a5, b5 = shards(n, epoch=1, start=10)
    assert a5 == a1[5:] and b5 == b1[5:] and not set(a5) & set(b5)
    assert sorted(a1[:5] + b1[:5] + a5 + b5) == list(range(n))
    # on one process the rest of the epoch is the same examples, in the permutation's order
    single = ResumableSampler(range(n), num_replicas=1, rank=0, seed=0)
    single.set_position(1, 10)
    one = list(single)
    assert sorted(one) == sorted(a5 + b5) and one[0::2] == a5 and one[1::2] == b5
    # an odd size: DistributedSampler pads with the first shuffled indices, so one example is seen twice
    a, b = shards(7)
    assert len(a) == len(b) == 4 and len(set(a) & set(b)) == 1 and set(a + b) == set(range(7))


def torchrun(script: str, cmd_args: list, cwd, env_extra: dict | None = None, timeout: float = 120):
    """Run ``script`` on two gloo ranks; returns (exit code, output, [(time, line)], time of the exit). A run
    that outlives ``timeout`` (a hang) is killed, launcher and ranks, and fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *cmd_args]
    # one thread per rank: the two ranks share two cores
    env = cli_env(str(cwd), {"OMP_NUM_THREADS": "1", **(env_extra or {})})
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_dir = cmd_args[cmd_args.index("--out_dir" if "--out_dir" in cmd_args else "--resume") + 1]
    hung = threading.Event()

    def kill():
        hung.set()
        proc.kill()
        for pid in ranks_of(out_dir):  # the ranks run in sessions of their own: kill each
            os.kill(pid, signal.SIGKILL)

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    lines = [(time.monotonic(), line) for line in proc.stdout]  # until the launcher and both ranks are gone
    proc.wait()
    ended = time.monotonic()
    watchdog.cancel()
    out = "".join(line for _, line in lines)
    assert not hung.is_set(), f"torchrun hung; killed after {timeout} s:\n{out[-3000:]}"
    return proc.returncode, out, lines, ended


def ranks_of(out_dir) -> list[int]:
    """The live processes with this run directory on their command line (the launcher and the ranks)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(out_dir).encode() in f.read():
                    pids.append(int(pid))
        except OSError:  # ended meanwhile
            pass
    return pids


@pytest.mark.slow
def test_nan_on_one_rank_skips_on_every_rank_and_only_rank0_writes(tmp_path, tiny_bert, tiny_pairs):
    cwd, probe = tmp_path / "cwd", tmp_path / "probe"
    cwd.mkdir()
    probe.mkdir()
    (probe / "probe.py").write_text(PROBE)
    run = cwd / "run"
    a = args(tiny_bert, tiny_pairs, run, max_steps=6, extra=("--keep_last", "10", "--accumulation_steps", "2"))
    rc, out, _, _ = torchrun(str(probe / "probe.py"), [os.path.join(ROOT, a[0]), *a[1:]], cwd,
                             {"DLM_FAULT_NAN_STEPS": "3,4", "DLM_FAULT_RANK": "1", "PROBE_DIR": str(probe)})
    assert rc == 0, out[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # one writer: every record once (log_every 1, eval only at the end)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "skip"] == [3, 4]
    assert [r["step"] for r in rows if r["split"] == "dev"] == [6]
    assert [r for r in rows if r["split"] == "train"][-1]["skipped_steps"] == 2
    assert out.count("update skipped") == 2 and out.count("done: 6 steps") == 1
    s2, s4, s6 = (load_file(run / "checkpoints" / f"step-00000000{k}" / "denoiser.safetensors") for k in (2, 4, 6))
    assert all(torch.equal(s2[k], s4[k]) for k in s2)  # no update at steps 3 and 4 ...
    assert any(not torch.equal(s4[k], s6[k]) for k in s4)  # ... and training went on
    # rank 1, whose loss was NaN, skipped the same updates: the replicas end with the same weights
    r0, r1 = torch.load(probe / "rank0.pt"), torch.load(probe / "rank1.pt")
    nan = [[math.isnan(x) for x in r["losses"]] for r in (r0, r1)]  # 2 micro-batches a step
    assert nan == [[False] * 12, [False] * 4 + [True] * 4 + [False] * 4]
    w0, w1 = r0["weights"], r1["weights"]
    assert w0.keys() == s6.keys() and all(torch.equal(w0[k], s6[k]) and torch.equal(w1[k], s6[k]) for k in s6)
    # exactly one set of files, all where they belong
    assert sorted(os.listdir(run)) == [".lock", "checkpoints", "metrics.jsonl", "plots"]  # rank 0's lock
    assert sorted(os.listdir(run / "checkpoints")) == ["best", "last", "step-000000002", "step-000000004",
                                                       "step-000000006"]
    assert sorted(os.listdir(cwd)) == [".hf_cache", "run", "run_logs"]
    assert len(os.listdir(cwd / "run_logs")) == 1  # one fitlog log
    assert sorted(os.listdir(probe)) == ["probe.py", "rank0.pt", "rank1.pt"]
    assert sorted(os.listdir(tiny_pairs)) == ["test.jsonl", "train.jsonl", "valid.jsonl"]
    assert not ranks_of(run)


@pytest.mark.slow
def test_failure_on_one_rank_stops_every_rank_promptly(tmp_path, tiny_bert, tiny_pairs):
    run = tmp_path / "run"
    a = args(tiny_bert, tiny_pairs, run, max_steps=1000)
    rc, out, lines, ended = torchrun(os.path.join(ROOT, a[0]), list(a[1:]), tmp_path,
                                     {"DLM_FAULT_RAISE_STEP": "3", "DLM_FAULT_RANK": "1"})
    msg = "RuntimeError: DLM_FAULT_RAISE_STEP: injected failure at step 3 on rank 1"
    assert rc != 0 and msg in out, out[-3000:]
    failed = next(t for t, line in lines if msg in line)
    # rank 0 learns of it at its next collective; a rank that sat out torchrun's SIGTERM would be
    # killed only 30 s later
    assert ended - failed < 20, out[-3000:]
    assert not ranks_of(run)
    assert sorted(os.listdir(run / "checkpoints")) == ["last"]
    assert ckpt_step(run) == 2


@pytest.mark.slow
def test_user_error_on_one_rank_ends_the_job_with_one_message(tmp_path, tiny_bert, tiny_pairs):
    # rank 0 reads the data first while rank 1 waits at a barrier: the error is raised on rank 0 only
    data = tmp_path / "data"
    shutil.copytree(tiny_pairs, data)
    (data / "train.jsonl").write_text("")
    run = tmp_path / "run"
    a = args(tiny_bert, str(data), run)
    rc, out, lines, ended = torchrun(os.path.join(ROOT, a[0]), list(a[1:]), tmp_path)
    errors = [(t, line) for t, line in lines if line.startswith("error: ")]
    assert rc != 0 and len(errors) == 1 and f"{data / 'train.jsonl'} is empty" in errors[0][1], out[-3000:]
    assert ended - errors[0][0] < 20, out[-3000:]
    assert not ranks_of(run)


# Runs train.py and records, at exit, the rows of every micro-batch it drew with the optimizer step that
# drew it, and its rank and pid.
BATCHES = '''
import json, os, runpy, sys
from runtime import training
stream, seen = training.micro_batches, []
def recorded(dataset, sampler, state, **kw):
    for batch in stream(dataset, sampler, state, **kw):
        seen.append([state.step + 1, batch["input_ids"].tolist()])
        yield batch
training.micro_batches = recorded
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(os.path.join(os.environ["PROBE_DIR"], f"{os.getpid()}.json"), "w") as f:
        json.dump({"rank": int(os.environ.get("RANK", 0)), "pid": os.getpid(), "batches": seen}, f)
'''


def examples_per_step(probe_dir) -> dict:
    """{step: Counter of the example rows that every process together drew for it}."""
    from collections import Counter
    steps = {}
    for name in os.listdir(probe_dir):
        for step, rows in json.loads((probe_dir / name).read_text())["batches"]:
            steps.setdefault(step, Counter()).update(map(tuple, rows))
    return steps


@pytest.mark.slow
def test_resume_on_another_number_of_processes_keeps_the_batch_and_the_data_position(tmp_path, tiny_bert,
                                                                                      tiny_pairs):
    probe = tmp_path / "batches.py"
    probe.write_text(BATCHES)
    cwd1, cwd2 = tmp_path / "c1", tmp_path / "c2"  # a datasets cache each: the first two run side by side
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    for d in (cwd1, cwd2, one.parent / "probe", two.parent / "probe"):
        d.mkdir(parents=True)
    train = os.path.join(ROOT, "train.py")
    # the oracle: one process, 2 micro-batches of 4 a step, 6 steps straight; beside it 2 steps on 2 ranks,
    # 1 micro-batch of 4 each (the same effective batch of 8)
    a_one = args(tiny_bert, tiny_pairs, one, max_steps=6, extra=("--batch_size", "4", "--accumulation_steps", "2"))
    a_two = args(tiny_bert, tiny_pairs, two, max_steps=2, extra=("--batch_size", "4"))
    first, _ = run_together(
        lambda: torchrun(str(probe), [train, *a_two[1:]], cwd2, {"PROBE_DIR": str(two.parent / "probe")},
                         timeout=300),
        lambda: run_cli(str(probe), train, *a_one[1:], cwd=str(cwd1),
                        env_extra={"PROBE_DIR": str(one.parent / "probe")}))
    assert first[0] == 0, first[1][-3000:]
    # steps 3-4 on one process, then 5-6 on two again, each with --resume alone
    p = run_cli(str(probe), train, "--resume", str(two), "--max_steps", "4", cwd=str(cwd2),
                env_extra={"PROBE_DIR": str(two.parent / "probe")})
    assert "1 process (was 2): --accumulation_steps 2 (was 1), the same effective batch of 8" in p.stdout
    assert "at step 2 (epoch 0, example 16)" in p.stdout
    done = set(os.listdir(two.parent / "probe"))
    rc, out, _, _ = torchrun(str(probe), [train, "--resume", str(two), "--max_steps", "6"], cwd2,
                             {"PROBE_DIR": str(two.parent / "probe")}, timeout=300)
    assert rc == 0 and "2 processes (was 1): --accumulation_steps 1 (was 2)" in out, out[-3000:]
    assert json.load(open(two / "checkpoints" / "last" / "run_config.json"))["config"]["accumulation_steps"] == 1
    # step by step, the same examples as the uninterrupted run: the effective batch and the data position held
    want, got = examples_per_step(one.parent / "probe"), examples_per_step(two.parent / "probe")
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5, 6]
    assert all(sum(want[s].values()) == 8 and got[s] == want[s] for s in want)
    assert len(set().union(*want.values())) > 40  # distinct examples: not one row repeated
    # under torchrun, rank 0 held the run directory's lock
    last = [json.loads((two.parent / "probe" / n).read_text()) for n in set(os.listdir(two.parent / "probe")) - done]
    (rank0,) = [r["pid"] for r in last if r["rank"] == 0]
    assert (two / ".lock").read_text().startswith(f"pid {rank0} ")
