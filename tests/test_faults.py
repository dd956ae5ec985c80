"""Training survives faults: SIGTERM/SIGINT save and exit, SIGKILL + --resume gives the uninterrupted
losses, a crash while saving leaves the previous checkpoint, non-finite losses skip the update and
stop the run after --max_bad_steps, --keep_last prunes old snapshots. Tiny DiffuSeq model, CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli_env, gauss_args, run_cli, run_together, train_losses

pytestmark = pytest.mark.slow  # every test trains

STEPS = 10


def args(tiny_bert, tiny_pairs, out, max_steps=STEPS, extra=()):
    # T = 4 and the lossaware sampler: its history is part of what a resume must restore
    return gauss_args(tiny_bert, tiny_pairs, out, max_steps=max_steps, T=4,
                      extra=("--eval_every", "0", "--save_every", "2", *extra))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_bert, tiny_pairs):
    cwd = tmp_path_factory.mktemp("straight")
    run_cli(*args(tiny_bert, tiny_pairs, cwd / "run"), cwd=str(cwd))
    return cwd / "run"


def start(cmd_args, cwd):
    """Start a script in the background (run_cli's environment), to signal or kill it."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, cmd_args[0]), *cmd_args[1:]], cwd=cwd,
                            env=cli_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run, proc, k, timeout=300):
    """Poll metrics.jsonl until the run has logged step >= k."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if max(train_losses(run), default=0) >= k:
                return
        except (OSError, ValueError):  # not there yet, or a line being written
            pass
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


def ckpt_step(run, name="last"):
    return json.load(open(run / "checkpoints" / name / "run_config.json"))["step"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits(tmp_path, straight, tiny_bert, tiny_pairs, sig):
    run = tmp_path / "run"
    proc = start(args(tiny_bert, tiny_pairs, run, max_steps=100000, extra=("--save_every", "100000")), str(tmp_path))
    wait_for_step(run, proc, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    k = ckpt_step(run)
    assert k >= 1  # the only checkpoint is the one written on the signal
    # continuing from it gives exactly the uninterrupted losses
    run_cli(*args(tiny_bert, tiny_pairs, run, max_steps=max(k, STEPS), extra=("--save_every", "100000",
                                                                               "--resume", str(run))), cwd=str(tmp_path))
    ref = train_losses(straight)
    got = train_losses(run)
    assert all(got[s] == ref[s] for s in range(1, STEPS + 1) if s in got) and len(got) >= STEPS


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, straight, tiny_bert, tiny_pairs):
    run = tmp_path / "run"
    proc = start(args(tiny_bert, tiny_pairs, run, max_steps=100000), str(tmp_path))
    wait_for_step(run, proc, 3)
    proc.kill()
    proc.wait()
    k = ckpt_step(run)
    assert k >= 2 and k % 2 == 0
    run_cli(*args(tiny_bert, tiny_pairs, run, max_steps=max(k + 2, STEPS), extra=("--resume", str(run))),
            cwd=str(tmp_path))
    ref, got = train_losses(straight), train_losses(run)
    for s in range(1, STEPS + 1):
        assert got[s] == ref[s], s  # bitwise on the CPU, including the steps after the resume


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, straight, tiny_bert, tiny_pairs):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = load_file(run / "checkpoints" / "last" / "denoiser.safetensors")
    p = run_cli(*args(tiny_bert, tiny_pairs, run, max_steps=STEPS + 2, extra=("--resume", str(run))), cwd=str(tmp_path),
                check=False, env_extra={"DLM_FAULT_CRASH_IN_SAVE": "1"})
    assert p.returncode == 99
    assert any(".tmp-" in d for d in os.listdir(run / "checkpoints"))  # the half-written one is there ...
    assert ckpt_step(run) == STEPS  # ... but last is still the good one, complete
    after = load_file(run / "checkpoints" / "last" / "denoiser.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    run_cli(*args(tiny_bert, tiny_pairs, run, max_steps=STEPS + 2, extra=("--resume", str(run))), cwd=str(tmp_path))
    assert ckpt_step(run) == STEPS + 2


def test_non_finite_losses_skip_the_update_then_stop(tmp_path, tiny_bert, tiny_pairs):
    run = tmp_path / "run"
    stop = tmp_path / "stop"
    (tmp_path / "c").mkdir()  # the second run's datasets cache: the two run side by side
    # NaN at steps 3 and 4; with --max_bad_steps 3 the run survives, with 2 it stops at step 4
    p, p_stop = run_together(
        lambda: run_cli(*args(tiny_bert, tiny_pairs, run, max_steps=6, extra=("--keep_last", "10")), cwd=str(tmp_path),
                        env_extra={"DLM_FAULT_NAN_STEPS": "3,4"}),
        lambda: run_cli(*args(tiny_bert, tiny_pairs, stop, max_steps=6, extra=("--max_bad_steps", "2", "--keep_last", "10")),
                        cwd=str(tmp_path / "c"), check=False, env_extra={"DLM_FAULT_NAN_STEPS": "3,4"}))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if r.get("split") == "skip"] == [3, 4]
    assert [r for r in rows if r.get("split") == "train"][-1]["skipped_steps"] == 2
    assert "update skipped" in p.stdout
    s2 = load_file(run / "checkpoints" / "step-000000002" / "denoiser.safetensors")
    s4 = load_file(run / "checkpoints" / "step-000000004" / "denoiser.safetensors")
    s6 = load_file(run / "checkpoints" / "step-000000006" / "denoiser.safetensors")
    assert all(torch.equal(s2[k], s4[k]) for k in s2)  # no weight changed in the skipped steps
    assert any(not torch.equal(s4[k], s6[k]) for k in s4)  # and training went on afterwards
    assert all(torch.isfinite(v).all() for v in s6.values())

    p = p_stop
    assert p.returncode == 2 and "2 non-finite losses in a row at step 4" in p.stderr.strip().splitlines()[-1]
    assert ckpt_step(stop) == 4
    last = load_file(stop / "checkpoints" / "last" / "denoiser.safetensors")
    assert all(torch.equal(s2[k], last[k]) for k in s2)  # the saved state is the last good one


def test_keep_last_prunes_old_snapshots(straight, tmp_path, tiny_bert, tiny_pairs):
    run = tmp_path / "run"
    run_cli(*args(tiny_bert, tiny_pairs, run, max_steps=8, extra=("--keep_last", "2")), cwd=str(tmp_path))
    snaps = sorted(d for d in os.listdir(run / "checkpoints") if d.startswith("step-"))
    assert snaps == ["step-000000006", "step-000000008"]
    assert ckpt_step(run, "step-000000006") == 6
