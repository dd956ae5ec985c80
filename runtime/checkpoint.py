"""Checkpoints: one directory each, written atomically; an absorbing one is laid out as a Hugging Face model
directory, a gaussian one holds this repository's own weight files and claims nothing of transformers.

Layout of ``<out_dir>/checkpoints/{last,best,step-<N>}/``::

    README.md                  the model card (runtime/model_card.py): process, data, step, dev metrics, commands
    run_config.json            the TrainConfig plus derived facts (vocab size, mask id, length prior, ...) and, at
                               the top level, step, best_dev_<key>, dev (best: the metrics it was chosen on) and
                               latest_dev (the latest evaluation, with its step)
    config.json                absorbing only: the transformers model config (the network is rebuilt from it,
                               offline). A gaussian checkpoint has none (``AutoModel`` could not load it): its
                               network is rebuilt from run_config.json; older gaussian checkpoints that have one
                               still load
    tokenizer files            tokenizer.save_pretrained
    model.safetensors          absorbing: the masked LM, transformers' names (``from_pretrained`` loads it)
    denoiser.safetensors       absorbing with token/layerwise time conditioning: those weights; gaussian: all weights
    denoiser_ema.safetensors   gaussian only: the EMA of the weights (what decoding uses by default)
    training_state.pt          optimizer, scheduler, step, data position, RNG states, world size (resume only;
                               in last/ only unless --save_training_state all)
    word_freq.json             copy of the spindle token counts, if used

The weight files and their key names (the denoiser's, never with DDP's ``module.`` prefix) are described
in runtime/weights.py. Old checkpoints hold ``model.pt`` and ``ema.pt`` (torch pickles of the state dict)
instead; they still load everywhere.

A checkpoint is written to ``<name>.tmp-<pid>`` and swapped in with renames, so a crash leaves the
previous good checkpoint (or ``<name>.old`` during the swap, which :func:`resolve` also finds); a write
that fails (a full disk) deletes its partial copy and says that the previous checkpoint is intact.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass

import torch

from common.errors import UserError
from runtime import faults, model_card, weights
from runtime.training import gather_rng_states, seed_everything, set_rng_state

RUN_CONFIG = "run_config.json"
TRAINING_STATE = "training_state.pt"


def save(ckpt_dir: str, *, run_config: dict, model: torch.nn.Module, ema_state: dict | None = None, hf_config=None,
         tokenizer=None, training_state: dict | None = None, extra_files: dict[str, str] | None = None) -> str:
    """Write a checkpoint directory atomically: ``model``'s weights and ``ema_state`` (a state dict of it) as
    runtime/weights.py lays them out, and the model card. ``extra_files`` maps names to source paths to copy.

    A failed write (a full disk, a quota) deletes the partial copy and raises ``UserError`` saying that the
    previous ``ckpt_dir``, untouched, is still there."""
    parent = os.path.dirname(os.path.abspath(ckpt_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{ckpt_dir}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, RUN_CONFIG), "w", encoding="utf-8") as f:
            json.dump(run_config, f, indent=2, sort_keys=True)
        if hf_config is not None and weights.holds_transformers_model(model):
            hf_config.save_pretrained(tmp)  # only beside a masked LM that transformers loads (gaussian: none)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weights.write(tmp, model, ema_state)  # after the config: save_pretrained adds the architectures to it
        faults.crash_in_save()
        faults.disk_full_in_save(tmp)
        if training_state is not None:
            torch.save(training_state, os.path.join(tmp, TRAINING_STATE))
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, name))
        model_card.write(tmp, run_config, ckpt_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        raise UserError(f"cannot write checkpoint {ckpt_dir} ({e.strerror or e}); {_previous(ckpt_dir)}") from e
    old = f"{ckpt_dir}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(ckpt_dir):
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)
    return ckpt_dir


def _previous(ckpt_dir: str) -> str:
    """What a failed save left: the earlier checkpoint of that name, which it did not touch."""
    try:
        with open(os.path.join(ckpt_dir, RUN_CONFIG), encoding="utf-8") as f:
            step = json.load(f).get("step")
    except (OSError, ValueError):
        return "there was no earlier checkpoint of that name"
    return (f"the previous {os.path.basename(ckpt_dir)} (step {step}) is intact and loads; free some space, "
            "then --resume continues from the last one")


def snapshot(ckpt_root: str, name: str, step: int, keep: int, training_state: bool = True) -> str:
    """Copy ``<ckpt_root>/<name>`` to ``step-<step>`` (atomically; without training_state.pt unless
    ``training_state``) and delete all but the ``keep`` newest ``step-*`` snapshots."""
    dst = os.path.join(ckpt_root, f"step-{step:09d}")
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(os.path.join(ckpt_root, name), tmp,
                        ignore=None if training_state else shutil.ignore_patterns(TRAINING_STATE))
        model_card.write(tmp, read_run_config(tmp), dst)  # its commands name the snapshot, not the copied one
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {dst} ({e.strerror or e}); {os.path.join(ckpt_root, name)} "
                        "is intact and loads") from e
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
            if os.path.isfile(os.path.join(d, RUN_CONFIG)) and weights.has_weights(d):
                return d
    raise UserError(f"{path} is neither a checkpoint directory (with {RUN_CONFIG} and {weights.MODEL}, "
                    f"{weights.DENOISER} or an old model.pt) nor a run directory with checkpoints/{prefer}")


def read_run_config(ckpt_dir: str) -> dict:
    try:
        with open(os.path.join(ckpt_dir, RUN_CONFIG), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {os.path.join(ckpt_dir, RUN_CONFIG)}: {e}") from e


def _numpy_rng_globals() -> list:
    """What a pickled ``np.random.get_state()`` (in the RNG states) needs beyond ``weights_only``'s defaults."""
    import numpy as np
    keys = np.random.get_state()[1]
    return [np.ndarray, np.dtype, type(keys.dtype), keys.__reduce__()[0]]


def load_training_state(ckpt_dir: str) -> dict:
    """``training_state.pt``, unpickled with ``weights_only=True`` (tensors, numbers, strings and numpy's RNG
    state only: a checkpoint file cannot run code)."""
    def load(path: str) -> dict:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    return weights.load_checked(ckpt_dir, TRAINING_STATE, load)


@dataclass
class TrainingState:
    """What ``--resume`` restores, and where the run is. ``objective`` contributes state of its own
    (``state_dict_extra``: the lossaware history); ``ema`` is a ``runtime.training.EMA`` or None."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: torch.nn.Module
    ema: object | None = None
    step: int = 0      # optimizer steps taken
    epoch: int = 0
    position: int = 0  # examples of this rank's shard consumed in the epoch
    best: float = math.inf  # best dev figure so far (objective.dev_key, lower is better)

    def save(self, ckpt_dir: str, info, run_config: dict, with_training_state: bool = True, **files) -> str | None:
        """Write a checkpoint: ``run_config`` plus the step and the best dev figure go to run_config.json;
        ``files`` are :func:`save`'s hf_config, tokenizer and extra_files; training_state.pt (what ``--resume``
        needs) unless ``with_training_state`` is False. Every rank must call it (it gathers every rank's RNG
        state); only the main rank writes."""
        rng = gather_rng_states(info)
        if not info.is_main:
            return None
        run_config = {**run_config, "step": self.step, f"best_dev_{self.objective.dev_key}": self.best}
        training_state = None
        if with_training_state:
            # position: examples of the epoch consumed by all ranks together (world_size records that; older
            # checkpoints, without it, counted one rank's)
            training_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                              "step": self.step, "epoch": self.epoch, "position": self.position, "best": self.best,
                              "rng": rng, "ema_updates": self.ema.updates if self.ema is not None else 0,
                              "world_size": len(rng), **self.objective.state_dict_extra()}
        return save(ckpt_dir, run_config=run_config, model=self.model,
                    ema_state=self.ema.state_dict() if self.ema is not None else None,
                    training_state=training_state, **files)

    def restore(self, ckpt_dir: str, rank: int, ts: dict | None = None, seed: int = 0) -> None:
        """Load what :meth:`save` wrote (``ts``: its training_state.pt, if already loaded). The RNG state is this
        rank's; a rank the saved run did not have starts a fresh stream seeded from (seed, rank, step)."""
        weights.load_into(ckpt_dir, self.model, "raw")
        ts = ts if ts is not None else load_training_state(ckpt_dir)
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.step, self.epoch, self.best = ts["step"], ts["epoch"], ts["best"]
        self.position = ts["position"] if "world_size" in ts else ts["position"] * len(ts["rng"])
        self.objective.load_state_dict_extra(ts)
        if self.ema is not None:
            self.ema.load_state_dict(weights.read(ckpt_dir, self.model, "ema"), ts["ema_updates"])
        if rank < len(ts["rng"]):
            set_rng_state(ts["rng"][rank])
        else:
            import numpy as np
            seed_everything(int(np.random.SeedSequence([seed, rank, self.step]).generate_state(1)[0]))


def saved_world_size(ts: dict) -> int:
    """The number of processes that trained up to a training state."""
    return ts.get("world_size", len(ts["rng"]))
