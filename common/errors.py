"""One clear error line and a non-zero exit for bad input, instead of a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input or an impossible request: reported as one ``error: ...`` line, exit code 2."""


def cli_main(fn):
    """Decorate a script's ``main``: ``UserError`` becomes one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
    return wrapper


def refuse_overwrite(path, overwrite: bool, what: str = "output file") -> None:
    """Stop before replacing a user's result unless ``--overwrite`` was given."""
    import os
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{what} {path} already exists; pass --overwrite to replace it or choose another name")


def require_at_least_one(ns, *names: str) -> None:
    """Each named flag (an attribute of ``ns``) must be a count of at least 1."""
    for name in names:
        if getattr(ns, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(ns, name)}")


def check_sampling_flags(ns) -> None:
    """``--topk``, ``--top_p`` and ``--temperature`` as the samplers accept them."""
    if ns.topk < 0 or not 0.0 < ns.top_p <= 1.0 or ns.temperature <= 0:
        raise UserError("need --topk >= 0, 0 < --top_p <= 1 and --temperature > 0")
