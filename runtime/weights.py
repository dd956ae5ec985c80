"""The denoiser's weights in a checkpoint directory, as safetensors files.

    model.safetensors          a BERT-family denoiser's masked LM (``BertDenoiser.mlm``), written by transformers'
                               ``save_pretrained``: transformers' key names, the decoder weight that is tied to the
                               word embeddings stored once. With config.json and the tokenizer beside it,
                               ``AutoModelForMaskedLM.from_pretrained(<dir>)`` loads it as a plain masked LM.
    denoiser.safetensors       the rest of the denoiser's state dict, under the denoiser's own names: the time
                               conditioning of a ``BertDenoiser`` (``time_token_ids``; or ``time_mlp.*`` and
                               ``time_proj.*``), absent with ``none``; all of a ``DiffuSeqTransformer`` (gaussian)
    denoiser_ema.safetensors   the EMA of the weights (gaussian runs): the whole state dict, the denoiser's names

safetensors holds no tensor twice, so weights that share storage (tied ones) are written once and
:func:`read` fills the others from the network's own tying, as transformers does.

Old checkpoints hold ``model.pt`` and ``ema.pt`` (``torch.save`` of the whole state dict). They still
load, with one line on stderr saying so.
"""
from __future__ import annotations

import os
import sys

import torch

from common.errors import UserError

MODEL = "model.safetensors"
DENOISER = "denoiser.safetensors"
DENOISER_EMA = "denoiser_ema.safetensors"
LEGACY = {"raw": "model.pt", "ema": "ema.pt"}  # the weight sets of an old checkpoint
HF_PREFIX = "mlm."  # where BertDenoiser keeps its transformers masked LM

_reported: set[str] = set()  # old checkpoints already announced in this process


def _hf_model(model: torch.nn.Module):
    """The transformers model the denoiser wraps (``BertDenoiser.mlm``), or None."""
    mlm = getattr(model, "mlm", None)
    return mlm if hasattr(mlm, "save_pretrained") else None


def holds_transformers_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` wraps a transformers masked LM (then its checkpoint is a transformers directory)."""
    return _hf_model(model) is not None


def has_weights(ckpt_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(ckpt_dir, f)) for f in (MODEL, DENOISER, LEGACY["raw"]))


def is_legacy(ckpt_dir: str) -> bool:
    """An old checkpoint: ``model.pt`` and no safetensors."""
    return (os.path.isfile(os.path.join(ckpt_dir, LEGACY["raw"]))
            and not any(os.path.isfile(os.path.join(ckpt_dir, f)) for f in (MODEL, DENOISER)))


def _storage_key(t: torch.Tensor):
    return t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype


def _save_file(state: dict, path: str) -> None:
    from safetensors.torch import save_file
    kept, seen = {}, set()
    for name, t in state.items():
        key = _storage_key(t)
        if key not in seen:  # a tied weight is stored once; read() restores its aliases
            seen.add(key)
            kept[name] = t.detach().to("cpu").contiguous()
    save_file(kept, path, metadata={"format": "pt"})


def _split(model: torch.nn.Module, state: dict) -> tuple[dict, dict]:
    """``state`` as (the masked LM's part, without the prefix; the rest). The rest leaves out what aliases a
    masked-LM tensor (``BertDenoiser._head`` is ``mlm.cls``): the network's structure restores it."""
    if _hf_model(model) is None:
        return {}, state
    hf = {k[len(HF_PREFIX):]: v for k, v in state.items() if k.startswith(HF_PREFIX)}
    in_hf = {_storage_key(v) for v in hf.values()}
    return hf, {k: v for k, v in state.items() if not k.startswith(HF_PREFIX) and _storage_key(v) not in in_hf}


def write(ckpt_dir: str, model: torch.nn.Module, ema_state: dict | None = None) -> None:
    """Write ``model``'s weights (and ``ema_state``, a state dict of it) into ``ckpt_dir``."""
    hf, state = _split(model, model.state_dict())
    mlm = _hf_model(model)
    if mlm is not None:
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a save is one line of the training log, not a bar
        try:
            mlm.save_pretrained(ckpt_dir, state_dict=hf)  # also config.json, with its architectures
        finally:
            if bar:
                hf_logging.enable_progress_bar()
    if state:
        _save_file(state, os.path.join(ckpt_dir, DENOISER))
    if ema_state is not None:
        _save_file(ema_state, os.path.join(ckpt_dir, DENOISER_EMA))


def load_checked(ckpt_dir: str, name: str, load) -> dict:
    """``load(path)`` of the checkpoint file ``name``; a missing or unreadable file is one clear error line."""
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {ckpt_dir} has no {name}")
    try:
        return load(path)
    except Exception as e:
        raise UserError(f"cannot load {path} (corrupt or incomplete checkpoint): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _load_file(ckpt_dir: str, name: str) -> dict:
    from safetensors.torch import load_file
    return load_checked(ckpt_dir, name, load_file)


def _load_legacy(ckpt_dir: str, name: str) -> dict:
    key = os.path.abspath(ckpt_dir)
    if os.path.isfile(os.path.join(ckpt_dir, name)) and key not in _reported:
        _reported.add(key)
        print(f"note: {ckpt_dir} is an old-format checkpoint (model.pt/ema.pt, torch pickles); it loads as before, "
              f"and checkpoints written now hold safetensors ({MODEL}, {DENOISER})", file=sys.stderr, flush=True)
    return load_checked(ckpt_dir, name, lambda path: torch.load(path, map_location="cpu", weights_only=True))


def read(ckpt_dir: str, model: torch.nn.Module, which: str = "raw") -> dict:
    """The state dict of ``model`` stored in ``ckpt_dir`` (on the CPU, keyed like ``model.state_dict()``):
    ``which`` is ``raw`` (the trained weights) or ``ema`` (their average, gaussian runs)."""
    if is_legacy(ckpt_dir):
        return check_finite(ckpt_dir, _load_legacy(ckpt_dir, LEGACY[which]), which)
    target = model.state_dict()
    if which == "ema":
        state = _load_file(ckpt_dir, DENOISER_EMA)
    else:
        hf, rest = _split(model, target)
        state = {HF_PREFIX + k: v for k, v in _load_file(ckpt_dir, MODEL).items()} if hf else {}
        if rest:
            state.update(_load_file(ckpt_dir, DENOISER))
    check_finite(ckpt_dir, state, which)
    groups: dict = {}
    for name, t in target.items():
        groups.setdefault(_storage_key(t), []).append(name)
    for names in groups.values():  # tied weights: the network's own tying says which file entry they share
        stored = [n for n in names if n in state]
        for n in names:
            if stored and n not in state:
                state[n] = state[stored[0]]
    return state


def check_finite(ckpt_dir: str, state: dict, which: str) -> dict:
    """``state``, unless a tensor holds NaN or inf: such weights decode to empty strings, or train to NaN, without
    a word, so they are refused at load, naming the first such tensor."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"checkpoint {ckpt_dir}: the {which} weight {name} {list(t.shape)} holds {bad} non-finite "
                            "value(s) (NaN or inf); use an earlier checkpoint (best/, last/ or step-N/)")
    return state


def load_into(ckpt_dir: str, model: torch.nn.Module, which: str = "raw") -> None:
    """Load :func:`read`'s weights into ``model``; one clear line when they do not fit it."""
    state = read(ckpt_dir, model, which)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        raise UserError(f"the weights in {ckpt_dir} do not fit the stored model config: {detail[:500]}") from e
