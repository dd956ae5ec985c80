"""train.py's run directory: what a fresh run may start in, what ``--overwrite`` clears, and what
``--resume RUN`` continues from. (One writer per run directory: common/lock.py.)

``--resume RUN`` continues the run in RUN with the flags of its stored run_config.json. Flags given on the
command line may change ``TrainConfig.RESUMABLE_CHANGES`` (each change is logged); any other that differs
is refused, naming it. The checkpoint is the newest of ``last/``, ``step-<N>/`` and ``best/`` whose files
all load (run_config.json, the weights' headers, training_state.pt): a damaged one is named in one line and
the next is tried. On another number of processes the accumulation changes so that the effective batch
(batch x accumulation x processes) stays the same; the data position counts the examples of all ranks
together, so it carries over (runtime/training.py, ResumableSampler).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass

from common.errors import UserError
from runtime import checkpoint, weights
from runtime.config import TrainConfig, from_dict

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TRAIN_OUTPUTS = (CHECKPOINTS, METRICS, "plots")  # what train.py writes into --out_dir (and --overwrite clears)
_KIND_ORDER = {"last": 0, "last.old": 1, "best": 3, "best.old": 4}  # step-<N>: 2; at equal steps, last first


def check_fresh(out_dir: str, overwrite: bool) -> None:
    """A new run (no ``--resume``) starts only in a folder without an earlier run, or with ``--overwrite``."""
    if overwrite:
        return
    ckpts = os.path.join(out_dir, CHECKPOINTS)
    if os.path.isdir(ckpts) and os.listdir(ckpts):
        raise UserError(f"{out_dir} already holds checkpoints; use --resume {out_dir} to continue, "
                        "--overwrite to start over, or another --out_dir")
    if os.path.isfile(os.path.join(out_dir, METRICS)):
        raise UserError(f"{out_dir} holds the {METRICS} of an earlier run (and no checkpoint to resume); use "
                        "--overwrite to start over, or another --out_dir")


def clear(out_dir: str) -> list[str]:
    """Delete what an earlier run wrote into ``out_dir`` (``TRAIN_OUTPUTS``); returns the names deleted."""
    gone = []
    for name in TRAIN_OUTPUTS:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        gone.append(name + "/" * (name != METRICS))
    return gone


# ---------------------------------------------------------------------------- --resume
@dataclass
class Resumed:
    """What ``--resume`` continues: the checkpoint, its files as loaded, and the run's config."""
    ckpt_dir: str
    run_config: dict      # its run_config.json
    training_state: dict  # its training_state.pt
    cfg: TrainConfig      # the stored config with the command line's changes


def run_dir_of(path: str) -> str | None:
    """The run directory that ``--resume PATH`` continues: PATH if it holds checkpoints/, the run of a
    checkpoint directory ``RUN/checkpoints/NAME``; None for a checkpoint directory outside a run."""
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINTS else None


def _stored_step(ckpt_dir: str) -> float:
    try:
        return float(checkpoint.read_run_config(ckpt_dir)["step"])
    except (UserError, KeyError, TypeError, ValueError):
        return math.inf  # unreadable: tried first, so that the damage is reported


def candidates(path: str) -> list[str]:
    """The checkpoints that ``--resume PATH`` may continue from, newest first: a run directory's last/,
    step-<N>/ and best/ (by their stored step); a checkpoint directory alone."""
    root = os.path.join(path, CHECKPOINTS)
    if not os.path.isdir(root):
        return [path]
    names = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and ".tmp-" not in d
             and (d in _KIND_ORDER or d.startswith("step-"))]
    dirs = [os.path.join(root, d) for d in names]
    return sorted(dirs, key=lambda d: (-_stored_step(d), _KIND_ORDER.get(os.path.basename(d), 2)))


def load_resumable(ckpt_dir: str) -> tuple[dict, dict]:
    """(run_config.json, training_state.pt) of ``ckpt_dir``, after checking that every file ``--resume``
    reads loads; a ``UserError`` naming the file otherwise."""
    run_config = checkpoint.read_run_config(ckpt_dir)
    if not weights.has_weights(ckpt_dir):
        raise UserError(f"{ckpt_dir} holds no weights")
    for name in (weights.MODEL, weights.DENOISER, weights.DENOISER_EMA):
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            weights.load_checked(ckpt_dir, name, _read_header)  # a cut-short file fails here
    if not os.path.isfile(os.path.join(ckpt_dir, checkpoint.TRAINING_STATE)):
        raise UserError(f"{ckpt_dir} has no {checkpoint.TRAINING_STATE} (weights only: with --save_training_state "
                        "last, the default, only checkpoints/last keeps one)")
    return run_config, checkpoint.load_training_state(ckpt_dir)


def _read_header(path: str) -> dict:
    """The tensor names of a safetensors file; it raises when the file is shorter than its header says."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return {k: None for k in f.keys()}


def pick(path: str, warn) -> tuple[str, dict, dict]:
    """(checkpoint directory, run config, training state) of the newest checkpoint of ``path`` that loads.
    Each damaged one it passes over is one ``warn`` line naming its bad file; a checkpoint directory given
    alone is used or refused, with no fallback."""
    if not os.path.exists(path):
        raise UserError(f"--resume {path} does not exist")
    found = candidates(path)
    if not found:
        raise UserError(f"{path} holds no checkpoint to resume from")
    reasons, damaged = [], []
    for ckpt_dir in found:
        try:
            picked = (ckpt_dir, *load_resumable(ckpt_dir))
        except UserError as e:
            if len(found) == 1:
                raise
            reasons.append(str(e))
            if os.path.isfile(os.path.join(ckpt_dir, checkpoint.TRAINING_STATE)) or ckpt_dir == found[0]:
                damaged.append(str(e))  # a weights-only snapshot is not damaged: it was written so
            continue
        for why in damaged:
            warn(f"warning: {why}; trying an older checkpoint")
        return picked
    raise UserError(f"no checkpoint of {path} can be resumed: {'; '.join(reasons)}")


def merged_config(args: TrainConfig, given: set[str], stored: dict, ckpt_dir: str, stored_world: int,
                  world: int, log) -> TrainConfig:
    """The stored config with the command line's ``given`` flags (values from ``args``), checked: a flag
    outside ``RESUMABLE_CHANGES`` that differs is refused; the accumulation keeps the effective batch on
    ``world`` processes (``stored_world`` trained the run)."""
    cfg = from_dict(stored)
    cfg.overwrite = False  # an action of the command that started the run, not a setting: never inherited
    changes = []
    for name in sorted(given):
        old, new = getattr(cfg, name), getattr(args, name)
        setattr(cfg, name, new)
        if name in TrainConfig.RESUMABLE_CHANGES and new != old and name not in ("resume", "out_dir"):
            changes.append(f"--{name} {new} (was {old})")
    cfg.check()
    acc = cfg.accumulation_steps if "accumulation_steps" in given else from_dict(stored).accumulation_steps
    stored_acc = from_dict(stored).accumulation_steps
    total = stored_acc * stored_world  # micro-batches per optimizer step, all processes together
    if total % world:
        raise UserError(f"cannot keep the effective batch of {cfg.batch_size * total} ({cfg.batch_size} x "
                        f"{stored_acc} accumulation x {stored_world} processes) on {world} processes; resume on "
                        f"a number of processes that divides {total}")
    if acc not in (stored_acc, total // world):
        raise UserError(f"cannot resume {ckpt_dir} with another config (--accumulation_steps: checkpoint "
                        f"{stored_acc} on {stored_world} processes vs now {acc} on {world}, which changes the "
                        f"effective batch)")
    cfg.accumulation_steps = total // world
    cfg.check_resume({**stored, "accumulation_steps": cfg.accumulation_steps}, ckpt_dir)
    if world != stored_world:
        changes.append(f"{world} process{'es' * (world != 1)} (was {stored_world}): --accumulation_steps {cfg.accumulation_steps} "
                       f"(was {stored_acc}), the same effective batch of {cfg.batch_size * total}")
    if changes:
        log(f"resume: {'; '.join(changes)}")
    return cfg


def plan(args: TrainConfig, given: set[str], world: int, log, warn) -> Resumed:
    """What ``--resume`` continues (see the module's docstring). The run continues in its run directory
    unless ``--out_dir`` is given."""
    ckpt_dir, run_config, ts = pick(args.resume, warn)
    cfg = merged_config(args, given, run_config["config"], ckpt_dir, checkpoint.saved_world_size(ts), world, log)
    if "out_dir" not in given:
        run_dir = run_dir_of(args.resume) or run_dir_of(ckpt_dir)
        if run_dir is None:
            raise UserError(f"{ckpt_dir} is not inside a run directory (RUN/checkpoints/NAME); pass --out_dir "
                            "for the continued run")
        cfg.out_dir = run_dir
    return Resumed(ckpt_dir, run_config, ts, cfg)


def same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)
