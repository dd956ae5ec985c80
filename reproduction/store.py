"""A reproduction folder's two records: ``settings.json`` (the scale's settings; a changed one is refused,
a part added since is not) and ``results.json`` (every part's results under its key)."""
from __future__ import annotations

import json
import math
import os

from common.errors import UserError
from common.io import write_json_atomic

from .runner import read_json

LAYOUT = 2  # results.json's layout: 2 holds every part's results under its key (1: a summary, before reproduction/)


def open_folder(out: str, scale: str, sc: dict) -> None:
    """Make ``out`` or continue it: a folder made before a setting existed (a part added since) is continued;
    a changed setting is refused."""
    os.makedirs(out, exist_ok=True)
    settings = os.path.join(out, "settings.json")
    now = json.loads(json.dumps({"scale": scale, **sc}))
    if os.path.exists(settings) and any(now.get(k) != v for k, v in read_json(settings).items()):
        raise UserError(f"{out} was made with other settings ({settings}); its steps cannot be reused: "
                        "give a new --out")
    write_json_atomic(settings, now)


def plain(obj):
    """``obj`` as JSON holds it: lists for tuples, str keys, Python numbers, null for a non-finite float."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # a numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_results(path: str) -> dict:
    """results.json of the current layout (one of an older layout is refused)."""
    doc = read_json(path)
    if doc.get("layout") != LAYOUT:
        raise UserError(f"{path} is of an older layout (before reproduction/); run the reproduction again in "
                        "that folder (its steps are reused) to rewrite it")
    return doc


def stored_results(out: str, scale: str, keys: set) -> dict:
    """The results of the parts in ``keys`` that an earlier invocation left in ``out`` (same settings:
    open_folder checked); a results.json of the older summary layout is not read (its parts are collected
    again when they run)."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return {}
    doc = read_json(path)
    if doc.get("layout") != LAYOUT or doc.get("scale") != scale:
        return {}
    return {k: v for k, v in doc.items() if k in keys}


def write_results(out: str, scale: str, sc: dict, seconds: float, results: dict, order: list) -> dict:
    """results.json: the scale, its settings, this invocation's wall time, then each part's results in
    ``order`` (the registry's keys)."""
    doc = {"layout": LAYOUT, "scale": scale, "settings": plain(sc), "seconds": seconds, "cpu_count": os.cpu_count(),
           **{k: plain(results[k]) for k in order if k in results}}
    write_json_atomic(os.path.join(out, "results.json"), doc)
    return doc
