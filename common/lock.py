"""One writer per output: an exclusive advisory lock on a folder, held for the life of a process.

``fcntl.flock`` locks belong to the open file description, so the kernel drops them when the
process dies, however it dies: a killed run leaves no stale lock to clean up. The lock file
``.lock`` inside the folder holds the holder's pid and command line, so that a second writer can
name it in its one error line.
"""
from __future__ import annotations

import contextlib
import os
import sys

from common.errors import UserError

LOCK_NAME = ".lock"

# Locks held by this process, by folder: a process may ask again for a folder it already holds.
_held: dict[str, int] = {}


def _describe(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "another process"


def _still_linked(fd: int, folder: str) -> bool:
    """Whether the locked file is still the folder's lock file (a holder may delete the folder when done)."""
    try:
        st = os.stat(os.path.join(folder, LOCK_NAME))
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def acquire(folder, what: str = "run directory") -> str:
    """Take the exclusive lock on ``folder`` (created if missing) and keep it until exit or ``release``.

    Raises ``UserError`` naming the holder when another process has it. Returns the folder's path.
    """
    import fcntl
    folder = os.path.abspath(os.fspath(folder))
    if folder in _held:
        return folder
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{what} {folder} is a file, not a folder")
    while True:
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write to {what} {folder}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise UserError(f"{what} {folder} is in use by {holder}; wait for it to finish or choose another "
                            f"folder") from None
        if _still_linked(fd, folder):
            break
        os.close(fd)  # the holder removed the folder (a finished partial result) before we locked: try afresh
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})\n".encode("utf-8", "replace"))
    _held[folder] = fd
    return folder


def holder(folder) -> str | None:
    """Who holds the lock on ``folder`` now (``"pid N (command)"``), or None; creates and writes nothing,
    so a check can run before a refusal that must leave the folder as it was."""
    import fcntl
    folder = os.path.abspath(os.fspath(folder))
    if folder in _held:
        return None
    try:
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY)
    except OSError:  # no lock file (or unreadable): nobody holds it through this file
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock conflicts only with a writer's
    except BlockingIOError:
        return _describe(fd)
    finally:
        os.close(fd)
    return None


def refuse_if_held(folder, what: str = "run directory") -> None:
    """The refusal that ``acquire`` would give, without taking the lock or touching the folder."""
    who = holder(folder)
    if who is not None:
        raise UserError(f"{what} {os.path.abspath(os.fspath(folder))} is in use by {who}; wait for it to finish "
                        f"or choose another folder")


def release(folder) -> None:
    """Give the lock back (it also goes when the process ends)."""
    folder = os.path.abspath(os.fspath(folder))
    fd = _held.pop(folder, None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def held(folder, what: str = "run directory"):
    """``with held(dir): ...``: the lock for the block only (unless this process held it already)."""
    folder = os.path.abspath(os.fspath(folder))
    already = folder in _held
    acquire(folder, what)
    try:
        yield folder
    finally:
        if not already:
            release(folder)
