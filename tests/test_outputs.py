"""predict.py, compute_elbo.py and the decoder keep what they computed (runtime.outputs): stopped by a real
SIGINT/SIGTERM at a chosen batch (runtime.faults) they exit 130/143 with one line, keep their finished batches,
and the rerun (for predict.py, under torchrun on 2 ranks) writes what an uninterrupted run writes (the oracle: that
run); predict.py runs as real processes, compute_elbo.py and the decoder in this process (the signal is as real,
without two interpreters' start-up); a second writer is refused naming the first one's pid; an unwritable output
stops before any work; --overwrite starts clean."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from common import lock
from common.errors import UserError
from conftest import ROOT, cli_env, one_error_line, run_cli, run_here, run_together
from runtime import dist, outputs



# ---------------------------------------------------------------- the plumbing, in this process
def test_map_batches_takes_kept_batches_as_they_are_and_saves_each_new_one_at_once(tmp_path, monkeypatch):
    """Oracle: a plain run of the same batches; the kept batch is a marker that no computation gives."""
    def draws(b, gen):
        return [b, torch.rand(3, generator=gen).tolist()]

    plain = dist.map_batches(4, draws, dist.DistInfo(), seed=5)
    out = outputs.Output(str(tmp_path / "p"), str(tmp_path / "p"))
    store = out.store("s")
    store.save(2, ["kept"])
    saved, save = [], store.save
    store.save = lambda b, r: (saved.append((b, out.kept())), save(b, r))
    assert dist.map_batches(4, draws, dist.DistInfo(), seed=5, store=store) == [plain[0], plain[1], ["kept"], plain[3]]
    assert saved == [(0, 1), (1, 2), (3, 3)]  # each saved before the next one starts; the kept one not again
    assert store.load() == {0: plain[0], 1: plain[1], 2: ["kept"], 3: plain[3]}

    (tmp_path / "p" / "s" / "batch-000001.json").write_text("{not json")
    with pytest.raises(UserError, match="batch-000001.json .*delete it"):
        store.load()

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(outputs, "write_text_atomic", full_disk)
    with pytest.raises(UserError, match=r"cannot save batch 7 .*No space left on device; the batches finished "
                                        r"before it are kept in .*p: rerun the same command"):
        save(7, [])


def test_a_lock_whose_file_was_removed_is_not_taken(tmp_path):
    """A finished result removes its partial folder, lock file included: a process that opened that file just
    before must not count it as the lock (common.lock retries on the folder's new lock file)."""
    folder = tmp_path / "x.partial"
    lock.acquire(folder)
    try:
        fd = os.open(folder / lock.LOCK_NAME, os.O_RDWR)
        assert lock._still_linked(fd, str(folder))
        shutil.rmtree(folder)
        assert not lock._still_linked(fd, str(folder))
        folder.mkdir()
        (folder / lock.LOCK_NAME).write_text("")
        assert not lock._still_linked(fd, str(folder))  # another file of the same name
        os.close(fd)
    finally:
        lock.release(folder)
    with lock.held(folder):  # and the next writer gets the lock
        assert str(folder) in lock._held


def signal_after(batches: int, sig: str) -> dict:
    return {"DLM_FAULT_SIGNAL_AFTER_BATCHES": str(batches), "DLM_FAULT_SIGNAL": sig}


def stopped(proc, sig: str, kept: int, partial) -> None:
    """Exit status 128 + the signal and, last on stderr, one line saying how many batches were kept where."""
    assert proc.returncode == 128 + getattr(signal, f"SIG{sig}"), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"stopped by SIG{sig}; kept {kept} finished batch(es) in {partial}" in last, last


TIMING = ("wall_seconds", "sequences_per_second", "seconds", "resumed_batches", "resume")


def same_but_timing(a: dict, b: dict, names=()) -> None:
    """Two result records agree on everything but the time taken, the resumption and ``names``."""
    skip = (*TIMING, *names)
    assert a.keys() == b.keys()
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


PREDICT = ("--num_samples", "6", "--steps", "4", "--batch_size", "2", "--seed", "7")  # 3 batches


@pytest.mark.slow
def test_predict_stopped_by_sigint_continues_to_the_uninterrupted_file(lm_run, tmp_path):
    _, _, run, _ = lm_run
    gen = tmp_path / "gen"
    args = ("predict.py", "--checkpoint", str(run), *PREDICT, "--out_dir", str(gen))
    _, cut = run_together(
        lambda: run_cli(*args, "--name", "full", cwd=str(tmp_path)),
        lambda: run_cli(*args, "--name", "cut", cwd=str(tmp_path), check=False, env_extra=signal_after(1, "INT")))
    partial = gen / "cut.partial"
    stopped(cut, "INT", 1, partial)
    assert sorted(os.listdir(partial)) == [".lock", "batch-000000.json", "settings.json"]
    assert not (gen / "cut.txt").exists() and not (gen / "cut.json").exists()

    # continued under torchrun on 2 gloo ranks: the kept batch is batch 0 whichever rank would have computed it
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, args[0]))
    again = run_cli(*torchrun, *args[1:], "--name", "cut", "--resume", cwd=str(tmp_path))
    assert again.stdout.count("resuming: 1 finished batch(es)") == 1
    assert (gen / "cut.txt").read_text() == (gen / "full.txt").read_text()
    assert len((gen / "cut.txt").read_text().splitlines()) == 6
    assert not partial.exists()  # the result is written: the kept batches and the lock go
    full, cut = (json.loads((gen / f"{n}.json").read_text()) for n in ("full", "cut"))
    assert cut["resumed_batches"] == 1 and full["resumed_batches"] == 0 and cut["ranks"] == 2
    same_but_timing(full, cut, ("name", "samples", "ranks"))  # the network calls too: summed over the kept batches


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
def test_a_second_predict_with_the_same_name_is_refused_naming_the_first(lm_run, tmp_path):
    _, _, run, _ = lm_run
    gen = tmp_path / "gen"
    args = ("--checkpoint", str(run), *PREDICT, "--out_dir", str(gen), "--name", "x")
    # the first pauses itself (SIGSTOP) after its first batch, holding the lock, until the test lets it go on
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "predict.py"), *args], cwd=str(tmp_path),
                             env=cli_env(str(tmp_path), signal_after(1, "STOP")), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while _state(first.pid) != "T":
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        second = run_here("predict.py", *args, cwd=str(tmp_path))
        one_error_line(second, f"in use by pid {first.pid} ")
        assert sorted(os.listdir(gen / "x.partial")) == [".lock", "batch-000000.json", "settings.json"]
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert len((gen / "x.txt").read_text().splitlines()) == 6 and not (gen / "x.partial").exists()


@pytest.mark.slow
def test_predict_with_other_settings_is_refused_and_overwrite_starts_clean(lm_run, tmp_path, monkeypatch):
    """In this process (a real SIGINT to itself): cheap, and the clean start is compared with a run here too."""
    _, _, run, _ = lm_run
    gen = tmp_path / "gen"
    args = ("predict.py", "--checkpoint", str(run), *PREDICT, "--out_dir", str(gen), "--name", "x")
    one_error_line(run_here(*args, "--resume", cwd=str(tmp_path)), "--resume", "no interrupted run")
    assert not (gen / "x.partial").exists()
    monkeypatch.setenv("DLM_FAULT_SIGNAL_AFTER_BATCHES", "2")
    assert run_here(*args, cwd=str(tmp_path)).returncode == 130
    monkeypatch.delenv("DLM_FAULT_SIGNAL_AFTER_BATCHES")
    other = (*args[:-1], "y")  # the oracle of the clean start: seed 8 from nothing, under another name
    seed8 = ("--seed", "8")
    one_error_line(run_here(*args, *seed8, cwd=str(tmp_path)), "--seed 7 (now 8)", "--overwrite")
    assert len(os.listdir(gen / "x.partial")) == 4  # refused: the kept batches are untouched
    assert run_here(*args, *seed8, "--overwrite", cwd=str(tmp_path)).returncode == 0
    assert run_here(*other, *seed8, cwd=str(tmp_path)).returncode == 0
    assert (gen / "x.txt").read_text() == (gen / "y.txt").read_text()
    assert json.loads((gen / "x.json").read_text())["resumed_batches"] == 0 and not (gen / "x.partial").exists()
    done = run_here(*args, *seed8, "--resume", cwd=str(tmp_path))
    assert done.returncode == 0 and "is complete; nothing to resume" in done.stdout and not (gen / "x.partial").exists()
    one_error_line(run_here(*args, *seed8, cwd=str(tmp_path)), "already exists", "--overwrite")


@pytest.mark.slow
def test_compute_elbo_stopped_in_its_baselines_continues_to_the_same_numbers(lm_run, tmp_path, monkeypatch):
    """In this process (a real SIGTERM to itself; the real processes are predict.py's above): the oracle, the
    stopped run and its continuation one after the other, sharing one datasets cache."""
    _, _, run, _ = lm_run
    args = ("compute_elbo.py", "--checkpoint", str(run), "--num_examples", "6", "--eval_steps", "2", "--batch_size", "2",
            "--seed", "3", "--baselines")  # 3 batches of the trained bound, 3 of the untrained, 3 of the unigram
    full, cut = tmp_path / "full.json", tmp_path / "cut.json"
    assert run_here(*args, "--out", str(full), cwd=str(tmp_path)).returncode == 0
    for k, v in signal_after(4, "TERM").items():
        monkeypatch.setenv(k, v)
    proc = run_here(*args, "--out", str(cut), cwd=str(tmp_path))
    monkeypatch.delenv("DLM_FAULT_SIGNAL_AFTER_BATCHES")
    partial = tmp_path / "cut.json.partial"
    stopped(proc, "TERM", 4, partial)
    assert len(os.listdir(partial / "elbo")) == 3 and len(os.listdir(partial / "untrained")) == 1
    assert run_here(*args, "--out", str(cut), cwd=str(tmp_path)).returncode == 0
    a, b = json.loads(full.read_text()), json.loads(cut.read_text())
    assert b["resumed_batches"] == 4 and not partial.exists()
    same_but_timing(a, b)  # the bound, its standard error and both baselines, to the last bit


@pytest.mark.slow
def test_decoder_stopped_between_seeds_continues_to_the_same_files_and_overwrite_clears_them(seq2seq_run, tmp_path,
                                                                                            monkeypatch):
    """In this process, as the compute_elbo test above."""
    cwd, run = seq2seq_run
    args = ("predict_downstream_condition.py", "--checkpoint", str(run), "--num_examples", "4", "--steps", "2",
            "--batch_size", "2", "--mbr_size", "2", "--seed", "5", "--out_dir", str(tmp_path / "dec"))
    assert run_here(*args, "--name", "full", cwd=str(tmp_path)).returncode == 0
    for k, v in signal_after(3, "INT").items():
        monkeypatch.setenv(k, v)
    proc = run_here(*args, "--name", "cut", cwd=str(tmp_path))
    monkeypatch.delenv("DLM_FAULT_SIGNAL_AFTER_BATCHES")
    full, cut = tmp_path / "dec" / "full", tmp_path / "dec" / "cut"
    stopped(proc, "INT", 3, cut / "partial")
    # seed 5 finished and written; seed 6 has one of its two batches
    assert sorted(os.listdir(cut)) == [".lock", "copy_source.jsonl", "partial", "seed5.jsonl"]
    assert os.listdir(cut / "partial" / "seed6") == ["batch-000000.json"]
    assert run_here(*args, "--name", "cut", cwd=str(tmp_path)).returncode == 0
    names = ["copy_source.jsonl", "mbr.jsonl", "seed5.jsonl", "seed6.jsonl"]
    assert sorted(os.listdir(cut)) == sorted([".lock", "decode.json", *names])
    for name in names:
        assert (cut / name).read_text() == (full / name).read_text(), name
    a, b = (json.loads((d / "decode.json").read_text()) for d in (full, cut))
    for t in a["timings"] + b["timings"]:
        del t["wall_seconds"], t["resumed_batches"]
    same_but_timing(a, b, ("name",))

    # --overwrite with one candidate: the earlier seed6.jsonl and mbr.jsonl do not linger beside the new result
    assert run_here(*args[:-6], "--mbr_size", "1", "--seed", "5", *args[-2:], "--name", "cut", "--overwrite",
                    cwd=str(tmp_path)).returncode == 0
    assert sorted(os.listdir(cut)) == [".lock", "copy_source.jsonl", "decode.json", "seed5.jsonl"]
    assert json.loads((cut / "decode.json").read_text())["mbr_size"] == 1
    one_error_line(run_here(*args, "--name", "never", "--resume", cwd=str(tmp_path)), "no interrupted run")
    assert sorted(os.listdir(tmp_path / "dec")) == ["cut", "full"]  # and no empty folder for it


@pytest.mark.slow
def test_an_unwritable_output_is_one_line_before_any_work(lm_run, seq2seq_run, tmp_path):
    _, _, run, _ = lm_run
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    under = str(blocker / "out")
    for args in (("predict.py", "--checkpoint", str(run), "--out_dir", under),
                 ("compute_elbo.py", "--checkpoint", str(run), "--out", os.path.join(under, "e.json")),
                 ("predict_downstream_condition.py", "--checkpoint", str(seq2seq_run[1]), "--out_dir", under)):
        p = run_here(*args, cwd=str(tmp_path))
        one_error_line(p, "cannot write to --out", f"{blocker} is a file, not a folder")
        assert p.stdout == ""  # stopped before loading the checkpoint
    assert blocker.read_text() == "not a folder"


def _read_only(folder, args, cwd):
    """``args`` run with ``folder`` read-only for real: a read-only tmpfs in a mount namespace of its own as root
    (root writes through chmod), a chmod 555 folder otherwise; None where neither is possible."""
    cmd = [sys.executable, os.path.join(ROOT, args[0]), *args[1:]]
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:
        if not shutil.which("unshare"):
            return None
        cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" || exit 77; exec "$@"', str(folder), *cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(cwd), capture_output=True, text=True, timeout=300)
    return None if proc.returncode == 77 else proc


@pytest.mark.slow
def test_a_read_only_output_folder_is_one_line_before_any_work(lm_run, tmp_path):
    _, _, run, _ = lm_run
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = _read_only(ro, ("predict.py", "--checkpoint", str(run), "--out_dir", str(ro)), str(tmp_path))
    if proc is None:
        pytest.skip("no way to make a folder read-only for this user here")
    one_error_line(proc, f"cannot write to --out_dir {ro}")
    assert "Read-only file system" in proc.stderr or "Permission denied" in proc.stderr
    assert proc.stdout == "" and os.listdir(ro) == []
