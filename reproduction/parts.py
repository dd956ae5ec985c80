"""The registry of the reproduction's parts, in the results page's order. A new part is a module of
``reproduction/`` with a ``PART`` (``reproduction.spec.Part``) and joins by one line in ``MODULES``."""
from __future__ import annotations

from importlib import import_module

from .render import META_KEYS

MODULES = (
    "lm",       # 1 + 2: the synthetic language; DiffusionBERT's ablations
    "bible",    # 2b: pretrained MiniLM against the same network from scratch
    "seq2seq",  # 3: reverse-and-map; DiffuSeq, adaptive decay and post-training
    "glm",      # 4: the Gaussian LM, infilling and length control
    "samplers", # 5: the sampler study: every decoding rule judged exactly, beside an AR baseline
)
PARTS = [import_module(f"{__package__}.{name}").PART for name in MODULES]
SCALES = ("smoke", "quick", "full")


def check(parts: list) -> None:
    """Every key once, none of results.json's own keys."""
    keys = [p.key for p in parts]
    clash = {k for k in keys if keys.count(k) > 1 or k in META_KEYS}
    assert not clash, f"reproduction parts: keys used twice or reserved: {sorted(clash)}"


check(PARTS)


def scale_settings(scale: str, parts: list | None = None) -> dict:
    """The scale's settings: every part's, merged in the registry's order (a setting two parts share, such as
    ``lm_long``, is given by one and read by both)."""
    sc = {}
    for part in PARTS if parts is None else parts:
        sc |= part.settings.get(scale, {})
    return sc


def default_parts(scale: str, parts: list | None = None) -> list[str]:
    return [p.key for p in (PARTS if parts is None else parts) if scale in p.default_scales]
