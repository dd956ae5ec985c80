"""Atomic file writes: a result file is either complete or absent, never half-written."""
from __future__ import annotations

import json
import os
import uuid


def write_bytes_atomic(path, data: bytes) -> str:
    """Write through a temporary file in the same folder, fsync, then ``os.replace``.

    A plain ``open(..., "xb")`` (not ``tempfile.mkstemp``, which forces mode 0600) keeps the usual
    permissions; the pid and a random suffix keep concurrent writers apart.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text_atomic(path, text: str) -> str:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, obj, indent: int | None = 2) -> str:
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
