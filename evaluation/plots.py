"""Small PNG line plots (matplotlib, Agg backend) for training curves and quality-against-steps.

Every function takes plain numbers and writes one PNG atomically; nothing here reads a run.
"""
from __future__ import annotations

import io
import json
import os

from common.io import write_bytes_atomic


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    return plt


def read_metrics(path: str, split: str, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in the ``split`` rows of a run's ``metrics.jsonl``."""
    steps, values = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == split and key in row:
                steps.append(int(row["step"]))
                values.append(float(row[key]))
    return steps, values


def line_plot(path: str, series: list[dict], title: str, xlabel: str, ylabel: str,
              hlines: list[dict] | None = None, logx: bool = False) -> str:
    """One PNG with a line per ``series`` entry ``{"label", "x", "y", ["yerr"], ["style"]}`` and a
    dashed horizontal line per ``hlines`` entry ``{"label", "y"}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for s in series:
        if s.get("yerr") is not None:
            ax.errorbar(s["x"], s["y"], yerr=s["yerr"], label=s["label"], marker="o", ms=3, capsize=3,
                        linestyle=s.get("style", "-"))
        else:
            ax.plot(s["x"], s["y"], s.get("style", "-"), label=s["label"], marker="o", ms=3)
    for i, h in enumerate(hlines or []):
        ax.axhline(h["y"], color=f"C{(len(series) + i) % 10}", linestyle="--", linewidth=1, label=h["label"])
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_bytes_atomic(path, buf.getvalue())
