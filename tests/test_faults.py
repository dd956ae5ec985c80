"""Training survives faults: SIGTERM/SIGINT save and exit, SIGKILL + --resume gives the uninterrupted
losses, a crash or a full disk while saving leaves the previous checkpoint, non-finite losses skip the
update and stop the run after --max_bad_steps, --keep_last prunes old snapshots; one writer per run
directory, --resume RUN alone continues with the run's flags and falls back past damaged checkpoints,
--overwrite starts clean. Tiny DiffuSeq model, CPU."""
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

from conftest import (ROOT, cli_env, files_of, gauss_args, one_error_line, run_cli, run_here, run_together,
                      train_losses)

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


def test_crash_or_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, straight, tiny_bert, tiny_pairs,
                                                                       monkeypatch):
    """The crash (os._exit) in a real process; the full disk and the good resume after it in this process (no
    losses compared, so this process's thread count does not matter)."""
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
    # a full disk half-way through the save (ENOSPC): one line, the partial copy deleted, last untouched
    crashed = sorted(os.listdir(run / "checkpoints"))
    monkeypatch.setenv("DLM_FAULT_DISK_FULL_IN_SAVE", "1")
    p = run_here("train.py", "--resume", str(run), "--max_steps", str(STEPS + 2), cwd=str(tmp_path))
    monkeypatch.delenv("DLM_FAULT_DISK_FULL_IN_SAVE")
    one_error_line(p, "cannot write checkpoint", "No space left on device", f"(step {STEPS}) is intact")
    assert sorted(os.listdir(run / "checkpoints")) == crashed and ckpt_step(run) == STEPS
    after = load_file(run / "checkpoints" / "last" / "denoiser.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert run_here("train.py", "--resume", str(run), "--max_steps", str(STEPS + 2), cwd=str(tmp_path)).returncode == 0
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


def test_a_second_writer_is_refused_naming_the_first(tmp_path, tiny_bert, tiny_pairs):
    run = tmp_path / "run"
    first = start(args(tiny_bert, tiny_pairs, run, max_steps=100000, extra=("--save_every", "1")), str(tmp_path))
    try:
        wait_for_step(run, first, 2)
        (tmp_path / "c").mkdir()
        second = run_cli(*args(tiny_bert, tiny_pairs, run), cwd=str(tmp_path / "c"), check=False)
        one_error_line(second, f"{run} is in use by pid {first.pid} ")
        p = run_here("train.py", "--resume", str(run), cwd=str(tmp_path / "c"))  # nor may it be resumed meanwhile
        one_error_line(p, f"in use by pid {first.pid} ")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert (run / ".lock").read_text().startswith(f"pid {first.pid} ")  # left behind, but no longer held
    p = run_here("train.py", "--resume", str(run), "--max_steps", "1", cwd=str(tmp_path / "c"))
    assert p.returncode == 0 and "nothing to do" in p.stdout


def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_resume_alone_takes_the_runs_flags_and_falls_back_past_damaged_checkpoints(tmp_path, straight, tiny_bert,
                                                                                   tiny_pairs):
    run = tmp_path / "run"
    run_cli(*args(tiny_bert, tiny_pairs, run, max_steps=6, extra=("--keep_last", "3", "--save_training_state", "all")),
            cwd=str(tmp_path))
    ckpts = run / "checkpoints"
    assert all((ckpts / d / "training_state.pt").is_file() for d in ("best", "last", "step-000000004"))
    first = json.load(open(ckpts / "step-000000004" / "run_config.json"))["config"]
    # the newest checkpoints are damaged: each is named in one line, and the newest that loads is step 4
    truncate(ckpts / "last" / "training_state.pt")
    truncate(ckpts / "step-000000006" / "denoiser.safetensors")
    (ckpts / "best" / "run_config.json").write_text("{not json")
    (tmp_path / "c").mkdir()  # another working directory: nothing may be written there
    p = run_cli("train.py", "--resume", str(run), "--max_steps", "8", "--save_every", "1", cwd=str(tmp_path / "c"))
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3 and all("trying an older checkpoint" in w for w in warnings), p.stderr
    for bad in (ckpts / "best" / "run_config.json", ckpts / "last" / "training_state.pt",
                ckpts / "step-000000006" / "denoiser.safetensors"):
        assert sum(str(bad) in w for w in warnings) == 1, (bad, warnings)
    assert f"resume: {ckpts / 'step-000000004'} at step 4" in p.stdout
    assert "resume: --max_steps 8 (was 6); --save_every 1 (was 2)" in p.stdout  # the changes, logged
    assert "outputs" not in os.listdir(tmp_path / "c")  # it continued in run, not in outputs/run
    ref, got = train_losses(straight), train_losses(run)
    assert all(got[s] == ref[s] for s in range(1, 9)), (got, ref)  # bitwise: the uninterrupted run's losses
    stored = json.load(open(ckpts / "last" / "run_config.json"))["config"]
    assert stored == {**first, "max_steps": 8, "save_every": 1, "resume": str(run)}  # the rest: run_config.json
    # any other flag that differs is refused, naming it; a resume that has nothing to do writes nothing
    p = run_here("train.py", "--resume", str(run), "--lr", "0.5", cwd=str(tmp_path))
    one_error_line(p, "--lr: checkpoint 0.001 vs now 0.5")
    before = files_of(run)
    p = run_here("train.py", "--resume", str(run), cwd=str(tmp_path))
    assert p.returncode == 0 and "at step 8, --max_steps 8: nothing to do" in p.stdout
    assert files_of(run) == before and not (tmp_path / "outputs").exists()


def test_weights_only_snapshots_by_default_and_no_fallback_without_a_training_state(tmp_path, straight):
    import shutil
    ckpts = straight / "checkpoints"
    assert (ckpts / "last" / "training_state.pt").is_file() and not (ckpts / "best" / "training_state.pt").exists()
    assert sorted(os.listdir(ckpts / "best")) == sorted(set(os.listdir(ckpts / "last")) - {"training_state.pt"})
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    truncate(run / "checkpoints" / "last" / "training_state.pt")
    p = run_here("train.py", "--resume", str(run), "--max_steps", str(STEPS + 2), cwd=str(tmp_path))
    one_error_line(p, "no checkpoint of", str(run / "checkpoints" / "last" / "training_state.pt"),
                   "only checkpoints/last keeps one")


def test_overwrite_starts_a_clean_run(tmp_path, straight, tiny_bert, tiny_pairs):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "notes.txt").write_text("mine")
    p = run_here(*args(tiny_bert, tiny_pairs, run, max_steps=2), cwd=str(tmp_path))
    one_error_line(p, "already holds checkpoints", "--overwrite")
    shutil.rmtree(run / "checkpoints")  # a run that died before its first checkpoint left only its log
    p = run_here(*args(tiny_bert, tiny_pairs, run, max_steps=2), cwd=str(tmp_path))
    one_error_line(p, "metrics.jsonl of an earlier run", "--overwrite")
    p = run_here("train.py", "--resume", str(straight), "--overwrite", "--max_steps", "20", cwd=str(tmp_path))
    one_error_line(p, "--overwrite would delete the run")
    p = run_cli(*args(tiny_bert, tiny_pairs, run, max_steps=2, extra=("--overwrite",)), cwd=str(tmp_path))
    assert "--overwrite: deleted the earlier run's metrics.jsonl, plots/" in p.stdout
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]  # the old records are gone
    assert sorted(os.listdir(run)) == [".lock", "checkpoints", "metrics.jsonl", "notes.txt", "plots"]
    assert (run / "notes.txt").read_text() == "mine" and ckpt_step(run) == 2
