"""Checkpoints: one directory each, written atomically.

Layout of ``<out_dir>/checkpoints/{last,best}/``::

    run_config.json     the TrainConfig plus derived facts (vocab size, mask id, length prior, ...)
    config.json         the transformers model config (the network is rebuilt from it, offline)
    tokenizer files     tokenizer.save_pretrained
    model.pt            the denoiser's state dict (never with DDP's ``module.`` prefix)
    ema.pt              gaussian only: the EMA of the weights (what decoding uses by default)
    training_state.pt   optimizer, scheduler, step, data position, RNG states (resume only)
    word_freq.json      copy of the spindle token counts, if used

A checkpoint is written to ``<name>.tmp-<pid>`` and swapped in with renames, so a crash leaves the
previous good checkpoint (or ``<name>.old`` during the swap, which :func:`resolve` also finds).
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from common.errors import UserError

RUN_CONFIG = "run_config.json"


def save(ckpt_dir: str, *, run_config: dict, model_state: dict, hf_config=None, tokenizer=None,
         training_state: dict | None = None, extra_files: dict[str, str] | None = None,
         extra_states: dict[str, dict] | None = None) -> str:
    """Write a checkpoint directory atomically. ``extra_files`` maps names to source paths to copy;
    ``extra_states`` maps file names to objects for ``torch.save`` (e.g. ``ema.pt``)."""
    parent = os.path.dirname(os.path.abspath(ckpt_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{ckpt_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, RUN_CONFIG), "w", encoding="utf-8") as f:
        json.dump(run_config, f, indent=2, sort_keys=True)
    if hf_config is not None:
        hf_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(model_state, os.path.join(tmp, "model.pt"))
    if os.environ.get("DLM_FAULT_CRASH_IN_SAVE"):  # test hook: die with a half-written checkpoint
        os._exit(99)
    if training_state is not None:
        torch.save(training_state, os.path.join(tmp, "training_state.pt"))
    for name, obj in (extra_states or {}).items():
        torch.save(obj, os.path.join(tmp, name))
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(tmp, name))
    old = f"{ckpt_dir}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(ckpt_dir):
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)
    return ckpt_dir


def snapshot(ckpt_root: str, name: str, step: int, keep: int) -> str:
    """Copy ``<ckpt_root>/<name>`` to ``step-<step>`` (atomically) and delete all but the ``keep``
    newest ``step-*`` snapshots."""
    dst = os.path.join(ckpt_root, f"step-{step:09d}")
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(ckpt_root, name), tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    snaps = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step-") and ".tmp-" not in d)
    for old in snaps[:-keep]:
        shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    return dst


def resolve(path: str, prefer: str = "best") -> str:
    """Accept a checkpoint directory or a run directory (-> its ``checkpoints/<prefer>``)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist")
    candidates = [path, os.path.join(path, "checkpoints", prefer),
                  os.path.join(path, "checkpoints", "last" if prefer == "best" else "best")]
    for c in candidates:
        for d in (c, f"{c}.old"):
            if os.path.isfile(os.path.join(d, RUN_CONFIG)) and os.path.isfile(os.path.join(d, "model.pt")):
                return d
    raise UserError(f"{path} is neither a checkpoint directory (with {RUN_CONFIG} and model.pt) nor a run "
                    f"directory with checkpoints/{prefer}")


def read_run_config(ckpt_dir: str) -> dict:
    try:
        with open(os.path.join(ckpt_dir, RUN_CONFIG), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {os.path.join(ckpt_dir, RUN_CONFIG)}: {e}") from e


def load_state(ckpt_dir: str, name: str = "model.pt", map_location="cpu") -> dict:
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {ckpt_dir} has no {name}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UserError(f"cannot load {path} (corrupt or incomplete checkpoint): {e}") from e
