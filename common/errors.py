"""One clear error line and a non-zero exit for bad input, instead of a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input or an impossible request: reported as one ``error: ...`` line, exit code 2."""


def cli_main(fn):
    """Decorate a script's ``main``: ``UserError`` becomes one line on stderr and exit code 2. So does an
    argparse error (an unknown flag, an invalid choice, a missing required flag), in place of argparse's
    usage block and ``prog: error:`` line: the same exit status, and one line like every other bad input."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import argparse
        error = argparse.ArgumentParser.error
        argparse.ArgumentParser.error = _argparse_error
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        finally:
            argparse.ArgumentParser.error = error
    return wrapper


def _argparse_error(parser, message: str):
    raise UserError(f"{message} (see {parser.prog} --help)")


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
    """``--topk``, ``--top_p`` and ``--temperature`` as the samplers accept them (nan and inf are not)."""
    import math
    if ns.topk < 0 or not 0.0 < ns.top_p <= 1.0 or not 0 < ns.temperature < math.inf:
        raise UserError("need --topk >= 0, 0 < --top_p <= 1 and --temperature > 0")


def check_decoding_flags(ns) -> None:
    """What a decoding script can check before it loads a checkpoint: the filters, ``--steps`` and
    ``--batch_size`` of at least 1 and a non-empty ``--decode_respacing``."""
    check_sampling_flags(ns)
    require_at_least_one(ns, "batch_size", *(["steps"] if ns.steps is not None else []))
    if ns.decode_respacing is not None and not ns.decode_respacing.strip():
        raise UserError("--decode_respacing is empty: give full, uniform_N, adp_N or a comma-separated list of "
                        "steps (or leave the flag out for full)")
