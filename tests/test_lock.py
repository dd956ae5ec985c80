"""common.lock: a second real process is refused with the holder's pid; a killed holder leaves no lock."""
import os
import signal
import subprocess
import sys
import time

import pytest

from common import lock
from common.errors import UserError

HOLD = ("import sys, time; sys.path.insert(0, {root!r}); from common import lock; "
        "lock.acquire({folder!r}); print('held', flush=True); time.sleep(60)")


def _holder(folder):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(root=root, folder=str(folder))],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_process_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    folder = tmp_path / "run"
    p = _holder(folder)
    try:
        with pytest.raises(UserError, match=rf"in use by pid {p.pid} "):
            lock.acquire(folder)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the kernel dropped the dead holder's lock: no stale lock file blocks the next writer
    assert (folder / lock.LOCK_NAME).exists()
    with lock.held(folder):
        assert str(folder) in lock._held
    assert str(folder) not in lock._held


def test_a_file_in_place_of_the_folder_is_one_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        lock.acquire(f)


def test_holder_names_a_live_writer_and_touches_nothing(tmp_path):
    folder = tmp_path / "run"
    assert lock.holder(folder) is None and not folder.exists()  # creates nothing
    p = _holder(folder)
    try:
        path = folder / lock.LOCK_NAME
        before = path.read_bytes(), path.stat().st_mtime_ns
        assert lock.holder(folder).startswith(f"pid {p.pid} ")
        with pytest.raises(UserError, match=rf"in use by pid {p.pid} "):
            lock.refuse_if_held(folder)
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert lock.holder(folder) is None
    lock.refuse_if_held(folder)
