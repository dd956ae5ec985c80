"""Small PNG line plots (matplotlib, Agg backend) for training curves and quality-against-steps.

Every function takes plain numbers and writes one PNG atomically; nothing here reads a run.
"""
from __future__ import annotations

import io
import json
import math
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
    """One PNG with a line per ``series`` entry ``{"label", "x", "y"}`` and a dashed horizontal line per
    ``hlines`` entry ``{"label", "y"}``. Points with a non-finite value are left out (a series with none
    left is drawn as an empty legend entry); the x axis is logarithmic only if some point is left."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    drawn = 0
    for s in series:
        pts = [(x, y) for x, y in zip(s["x"], s["y"]) if math.isfinite(x) and math.isfinite(y)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", label=s["label"], marker="o", ms=3)
        drawn += len(pts)
    for i, h in enumerate(hlines or []):
        ax.axhline(h["y"], color=f"C{(len(series) + i) % 10}", linestyle="--", linewidth=1, label=h["label"])
    if logx and drawn:
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
