"""Results that survive: one writer per result, a writable check before the work, finished batches kept on
disk, and a clean stop on SIGINT/SIGTERM (predict.py, compute_elbo.py, predict_downstream_condition.py).

A result (predict.py's ``<name>.txt``/``.json``, compute_elbo.py's JSON, the decoder's folder) is computed
in batches. While it runs, every finished batch is a file ``batch-<b>.json``, written atomically, in a
*partial* folder beside the result (``<name>.partial/``, ``<out>.partial/``, ``<folder>/partial/``), with
``settings.json``: the flags that decide the numbers, the checkpoint's files and the device type. Batch b
draws from a generator of its own seeded with (seed, b) (``dist.map_batches``), never from what ran before
it in the process, so a rerun that loads the kept batches and computes the others writes the same result
as an uninterrupted run. The partial folder goes once the result is written.

* :func:`check_writable`, before loading anything: a read-only or missing output folder is one line now,
  not an ``OSError`` after the work.
* :func:`open_output` takes the result's exclusive lock (``common.lock``: a second writer gets one line
  naming the holder's pid), then continues a partial run with the same settings (one with other settings is
  refused, naming them), refuses a finished result unless ``--overwrite`` (which first removes it and any
  kept batches: a clean start), and with ``--resume`` reports a finished result as done.
* :func:`stop_on_signals`: SIGINT or SIGTERM ends the script with one line saying what was kept, and exit
  status 130 or 143 (128 + the signal's number, as a shell reports it).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import sys
import uuid
from dataclasses import dataclass

from common import lock
from common.errors import UserError
from common.io import write_text_atomic
from runtime import dist, faults

SETTINGS = "settings.json"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_BATCH = re.compile(r"batch-(\d+)\.json")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (:func:`stop_on_signals`); a BaseException, as KeyboardInterrupt is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_writable(folder, what: str = "output folder") -> None:
    """Raise ``UserError`` unless ``folder`` (made later if missing) can be written: a probe file is created
    and removed in it, or in its nearest existing parent, so that a read-only file system, a missing
    permission or a file in the way shows before the work and not after it. Creates nothing that stays."""
    path = os.path.abspath(os.fspath(folder))
    probe_dir = path
    while not os.path.lexists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        raise UserError(f"cannot write to {what} {folder}: {probe_dir} is a file, not a folder")
    probe = os.path.join(probe_dir, f".write-test-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {what} {folder}: {e.strerror or e}") from None


def checkpoint_files(ckpt_dir: str) -> dict:
    """{file name: [size, mtime_ns]} of a checkpoint directory: a kept batch is only reused for the same weights."""
    out = {}
    for name in sorted(os.listdir(ckpt_dir)):
        st = os.stat(os.path.join(ckpt_dir, name))
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            out[name] = [st.st_size, st.st_mtime_ns]
    return out


class BatchStore:
    """The finished batches of one computation: ``batch-<b>.json`` files in ``folder``, each written
    atomically (complete or absent). ``dist.map_batches(..., store=...)`` loads them and saves new ones."""

    def __init__(self, folder: str, output: Output):
        self.folder, self.output = folder, output

    def load(self) -> dict:
        """{batch index: result} of the batches kept here."""
        kept = {}
        if not os.path.isdir(self.folder):
            return kept
        for name in os.listdir(self.folder):
            m = _BATCH.fullmatch(name)
            if not m:
                continue
            path = os.path.join(self.folder, name)
            try:
                with open(path, encoding="utf-8") as f:
                    kept[int(m.group(1))] = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read the kept batch {path} ({e}); delete it to compute that batch again") from None
        return kept

    def save(self, b: int, result) -> None:
        path = os.path.join(self.folder, f"batch-{b:06d}.json")
        try:
            write_text_atomic(path, json.dumps(result, ensure_ascii=False))
        except OSError as e:
            raise UserError(f"cannot save batch {b} to {path}: {e.strerror or e}; the batches finished before it "
                            f"are kept in {self.output.partial}: rerun the same command to continue") from None
        self.output.saved += 1
        faults.signal_after_batches(self.output.saved)


@dataclass
class Output:
    """One result being computed: where its kept batches live and how many there were at the start."""
    partial: str        # the folder of kept batches and settings.json
    lock_dir: str       # the folder whose lock this process holds (rank 0); the partial folder or the result's
    resumed: int = 0    # batches kept by an earlier run
    saved: int = 0      # batches saved by this process
    done: bool = False  # the result is written

    def store(self, sub: str = "") -> BatchStore:
        """The batches of one computation (``sub``: e.g. a seed, when a result has several)."""
        return BatchStore(os.path.join(self.partial, sub), self)

    def kept(self) -> int:
        """Batches on disk now, under every computation."""
        return sum(1 for _, _, fs in os.walk(self.partial) for f in fs if _BATCH.fullmatch(f))

    def write_text(self, path: str, text: str) -> None:
        """A final file, atomically; a failure is one line saying where the computed batches are."""
        try:
            write_text_atomic(path, text)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}; the computed batches are kept in "
                            f"{self.partial}: rerun the same command to write the result") from None

    def write_json(self, path: str, obj) -> None:
        self.write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def finish(self, info: dist.DistInfo) -> None:
        """The result is written: every rank is done with the batches; rank 0 removes them and the lock."""
        dist.barrier(info)
        self.done = True
        if info.is_main:
            _clear(self.partial, keep_lock=False)
            lock.release(self.lock_dir)


_active: Output | None = None  # what an interruption reports


def _clear(folder: str, keep_lock: bool) -> None:
    """Remove ``folder`` (a partial folder), or everything in it but the lock file."""
    if not os.path.isdir(folder):
        return
    if not keep_lock:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in os.listdir(folder):
        if name != lock.LOCK_NAME:
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _differences(old: dict, new: dict) -> list[str]:
    """What a kept run's settings.json and this run's settings disagree on, as the user would say it."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "checkpoint_files":
            out.append("the checkpoint's files (changed since)")
        elif key in ("checkpoint", "device"):
            out.append(f"{key} {a} (now {b})")
        else:
            out.append(f"--{key} {a} (now {b})")
    return out


def open_output(finals: list[str], partial: str, settings: dict, *, resume: bool, overwrite: bool,
                info: dist.DistInfo, what: str, lock_dir: str | None = None, others: tuple = ()) -> Output | None:
    """Lock a result and decide how this run starts (module docstring); None if ``--resume`` finds it written.

    ``finals``: the result's files (written once the batches are done: any of them there and no partial run
    means the result exists, and it is never replaced without ``overwrite``). ``partial``:
    the kept-batches folder; ``lock_dir`` (default ``partial``): the folder to lock. ``others``: glob patterns
    of further files of the result that ``--overwrite`` removes. Under torchrun rank 0 decides and the other
    ranks follow."""
    global _active
    lock_dir = lock_dir or partial
    state = None
    if info.is_main:
        existed = os.path.isdir(lock_dir)
        lock.acquire(lock_dir, what)
        try:
            state = _start(finals, partial, json.loads(json.dumps(settings)), resume, overwrite, lock_dir, others,
                           what, info.log)
        finally:
            if state is None:  # refused, or finished already: give the lock back, and leave no empty folder
                if not existed or (lock_dir == partial and not os.path.exists(os.path.join(partial, SETTINGS))):
                    _clear(lock_dir, keep_lock=False)
                lock.release(lock_dir)
    state = dist.broadcast_from_main(state, info)
    if state is None:
        return None
    _active = Output(partial, lock_dir, resumed=state)
    return _active


def _start(finals, partial, settings, resume, overwrite, lock_dir, others, what, log) -> int | None:
    """Rank 0, holding the lock: the number of kept batches this run continues from, or None (finished)."""
    settings_file = os.path.join(partial, SETTINGS)
    if overwrite:
        for path in [*finals, *(p for pattern in others for p in glob.glob(os.path.join(lock_dir, pattern)))]:
            if os.path.isfile(path):
                os.remove(path)
        _clear(partial, keep_lock=lock_dir == partial)
    elif os.path.isfile(settings_file):
        with open(settings_file, encoding="utf-8") as f:
            old = json.load(f)
        diff = _differences(old, settings)
        if diff:
            raise UserError(f"{partial} holds an interrupted run with other settings: {'; '.join(diff)}; rerun it "
                            "with its own flags to continue it, or pass --overwrite to start again")
        kept = Output(partial, lock_dir).kept()
        log(f"resuming: {kept} finished batch(es) kept in {partial}")
        return kept
    elif any(os.path.exists(f) for f in finals):
        if resume and all(os.path.exists(f) for f in finals):
            log(f"{what} {finals[0]} is complete; nothing to resume")
            return None
        first = next(f for f in finals if os.path.exists(f))
        raise UserError(f"{what} {first} already exists; pass --overwrite to replace it or choose another name")
    elif resume:
        raise UserError(f"--resume: there is no interrupted run at {partial} (the same flags and --name find it)")
    else:
        stray = [n for n in (os.listdir(lock_dir) if os.path.isdir(lock_dir) else [])
                 if n not in (lock.LOCK_NAME, os.path.basename(partial))]
        if stray:
            raise UserError(f"{what} {lock_dir} already holds {', '.join(sorted(stray)[:3])} but no record of the run "
                            "that wrote them; pass --overwrite to start again or choose another name")
    os.makedirs(partial, exist_ok=True)
    write_text_atomic(settings_file, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    return 0


def _describe() -> str:
    out = _active
    if out is None:
        return "nothing was computed yet"
    if out.done:
        return "the result was already written"
    return (f"kept {out.kept()} finished batch(es) in {out.partial}; run the same command again (or with --resume) "
            "to continue")


@contextlib.contextmanager
def stop_on_signals(prog: str):
    """``with stop_on_signals("predict"):`` -- SIGINT/SIGTERM stop the block with one line (rank 0) saying what
    was kept, and exit status 128 + the signal (130, 143). A second signal during the stop ends at once."""
    global _active

    def interrupt(signum, frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        raise Interrupted(signum)

    try:
        old = {s: signal.signal(s, interrupt) for s in SIGNALS}
    except ValueError:  # not the main thread: leave the handlers as they are
        old = {}
    _active = None
    try:
        yield
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: stopped by {signal.Signals(e.signum).name}; {_describe()}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _active = None
