"""Metrics logging: fitlog (as the original code) when it imports, and always a JSONL file.

fitlog 0.9.15 uses ``np.str``, removed in numpy 1.24; the one shim for that lives here.
"""
from __future__ import annotations

import json
import os
import time


def _import_fitlog():
    try:
        import warnings

        import numpy as np
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns when the removed alias is probed
            if not hasattr(np, "str"):
                np.str = str  # fitlog 0.9.15 still refers to the alias numpy removed in 1.24
            import fitlog
        return fitlog
    except Exception:  # any import failure: fall back to JSONL only
        return None


class RunLogger:
    """Writes ``metrics.jsonl`` under ``run_dir`` and mirrors metrics to fitlog in ``log_dir``."""

    def __init__(self, run_dir: str, log_dir: str = "logs", config: dict | None = None,
                 enabled: bool = True, use_fitlog: bool = True):
        self.enabled = enabled
        self.fitlog = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._f = open(self.path, "a", encoding="utf-8")
        if use_fitlog:
            fitlog = _import_fitlog()
            if fitlog is not None:
                try:
                    os.makedirs(log_dir, exist_ok=True)
                    fitlog.set_log_dir(log_dir)
                    if config:
                        fitlog.add_hyper({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
                    self.fitlog = fitlog
                except Exception as e:  # fitlog refuses some set-ups; JSONL still works
                    print(f"logging: fitlog unavailable ({e}); writing {self.path} only")
        if self.fitlog is None:
            print(f"logging: metrics go to {self.path}")

    def log(self, step: int, split: str, **metrics) -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), "step": step, "split": split, **metrics}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self.fitlog is not None:
            try:
                self.fitlog.add_metric({split: metrics}, step=step)
            except Exception:
                pass

    def best(self, **metrics) -> None:
        """Mirror a new best dev result to fitlog (metrics.jsonl already has it as a ``dev`` record)."""
        if self.fitlog is not None:
            try:
                self.fitlog.add_best_metric({"dev": metrics})
            except Exception:
                pass

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self.fitlog is not None:
            try:
                self.fitlog.finish()
            except Exception:
                pass
