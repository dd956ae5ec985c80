"""Small PNG line plots (matplotlib's Agg canvas): training curves and quality against decoding steps.

``line_plot`` and ``figure`` take plain numbers; ``draw_training_plots`` reads a run's ``metrics.jsonl``
(train.py calls it at every evaluation) and ``compare_plot`` the rows of ``compute_metric.py --mode
compare``. Every PNG is written atomically and holds no date or version, so the same input gives the same
bytes. matplotlib is imported only when something is drawn.
"""
from __future__ import annotations

import gc
import io
import json
import math
import os

from common.io import write_bytes_atomic

PLOTS_DIR = "plots"  # under a run directory: train_loss.png, dev.png
MARKERS_UP_TO = 60  # points per series; a longer curve (a training loss) is drawn as a plain line

# The dev figure of each objective (runtime/objective.py), told apart by a key of its dev records:
# one panel per entry, (y label, log y, [(key, legend label)]); a key the records lack is left out.
DEV_PANELS = {
    "nelbo_per_token": [("NELBO per token (nats)", False, [("nelbo_per_token", "dev NELBO / token")]),
                        ("perplexity bound", True, [("ppl_token", "per token"), ("ppl_word", "per word")])],
    "loss": [("dev loss (EMA weights)", False, [("loss", "loss"), ("mse", "mse")])],
    "nll_per_token": [("exact NLL per token (nats)", False, [("nll_per_token", "dev NLL / token")]),
                      ("perplexity", True, [("ppl_token", "per token"), ("ppl_word", "per word")])],  # AR baseline
}
METRIC_NAMES = {"bleu": "BLEU", "bleu_reversed": "BLEU (reversed order)", "exact_match": "exact match",
                "token_accuracy": "token accuracy", "rouge_l": "ROUGE-L", "bertscore_f1": "BERTScore F1"}


def _figure_class():
    # the object API with an Agg canvas of its own: no pyplot state, and the backend of a process that
    # also shows figures is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    return Figure, FigureCanvasAgg


# --------------------------------------------------------------------------- reading a run's log


def read_log(path: str) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` as the run now stands.

    A resumed run (or one started again with ``--overwrite``) appends records for steps the file already
    has: when a split's step does not increase, the earlier records from that step on, of every split,
    are dropped. A line that is not a JSON record (a write cut short by a crash) is skipped."""
    rows, last = [], {}  # last: split -> its newest step
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                step, split = int(row["step"]), row["split"]
            except (ValueError, KeyError, TypeError):
                continue
            if step <= last.get(split, -1):
                rows = [r for r in rows if r["step"] < step]
                last = {r["split"]: r["step"] for r in rows}
            row["step"] = step
            rows.append(row)
            last[split] = step
    return rows


def read_metrics(path: str, split: str, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in the ``split`` records of a run's ``metrics.jsonl`` (``read_log``)."""
    pts = [(r["step"], float(r[key])) for r in read_log(path) if r["split"] == split and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


# --------------------------------------------------------------------------- drawing


def figure(path: str, panels: list[dict], title: str, xlabel: str, logx: bool = False) -> str:
    """One PNG of panels stacked over a shared x axis. A panel is ``{"ylabel", "series", "hlines"?,
    "logy"?}``: a line per ``series`` entry ``{"label", "x", "y", "alpha"?}`` and a dashed horizontal line per
    ``hlines`` entry ``{"label", "y"}``. Points with a non-finite value are left out (a series with none
    left is an empty legend entry); a log axis is used only where some point is left (log y: some
    positive one)."""
    Figure, Canvas = _figure_class()
    fig = Figure(figsize=(6.4, 4.2 + 2.8 * (len(panels) - 1)), dpi=110)
    Canvas(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    drawn_x = 0
    for ax, panel in zip(axes, panels):
        series, positive = panel["series"], 0
        for i, s in enumerate(series):
            pts = [(x, y) for x, y in zip(s["x"], s["y"]) if math.isfinite(x) and math.isfinite(y)]
            marker = "os^Dv"[i % 5] if len(pts) <= MARKERS_UP_TO else None  # shapes tell apart points that meet
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", label=s["label"], marker=marker, ms=3,
                    linewidth=1.5 if marker else 1, alpha=s.get("alpha", 1.0))
            drawn_x += len(pts)
            positive += sum(p[1] > 0 for p in pts)
        for i, h in enumerate(panel.get("hlines") or []):
            ax.axhline(h["y"], color=f"C{(len(series) + i) % 10}", linestyle="--", linewidth=1, label=h["label"])
        if panel.get("logy") and positive:
            ax.set_yscale("log")
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if logx and drawn_x:
        axes[0].set_xscale("log", base=2)
    axes[0].set_title(title, fontsize=10)
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version: same input, same bytes
    return write_bytes_atomic(path, buf.getvalue())


def line_plot(path: str, series: list[dict], title: str, xlabel: str, ylabel: str,
              hlines: list[dict] | None = None, logx: bool = False) -> str:
    """``figure`` with one panel: a line per ``series`` entry ``{"label", "x", "y"}``, a dashed line per
    ``hlines`` entry ``{"label", "y"}``, and a logarithmic x axis (base 2) if ``logx``."""
    return figure(path, [{"ylabel": ylabel, "series": series, "hlines": hlines}], title, xlabel, logx=logx)


# --------------------------------------------------------------------------- a run's curves


def _running_mean(y: list[float], window: int) -> list[float]:
    """Mean of the finite values among the last ``window`` (NaN where there are none); O(len(y))."""
    total, count = [0.0], [0]  # prefix sums over the finite values
    for v in y:
        ok = math.isfinite(v)
        total.append(total[-1] + (v if ok else 0.0))
        count.append(count[-1] + ok)
    out = []
    for i in range(1, len(y) + 1):
        j = max(0, i - window)
        n = count[i] - count[j]
        out.append((total[i] - total[j]) / n if n else math.nan)
    return out


def draw_training_plots(run_dir: str) -> list[str]:
    """(Re)draw ``<run_dir>/plots/train_loss.png`` (the training loss, and from 20 records on its running
    mean over a twentieth of them) and ``<run_dir>/plots/dev.png`` (the dev figures of the run's objective,
    ``DEV_PANELS``) from the whole of ``<run_dir>/metrics.jsonl``; returns the paths written (none before
    the first record)."""
    rows = read_log(os.path.join(run_dir, "metrics.jsonl"))
    out, name, written = os.path.join(run_dir, PLOTS_DIR), os.path.basename(os.path.normpath(run_dir)), []
    train = [(r["step"], float(r["loss"])) for r in rows if r["split"] == "train" and "loss" in r]
    if train:
        x, y = [p[0] for p in train], [p[1] for p in train]
        series = [{"label": "training loss", "x": x, "y": y}]
        if len(train) >= 20:  # a record is one optimizer step's loss: mostly noise
            window = max(5, len(train) // 20)
            series[0]["alpha"] = 0.4  # the mean in front
            series.append({"label": f"mean of the last {window} records", "x": x, "y": _running_mean(y, window)})
        written.append(line_plot(os.path.join(out, "train_loss.png"), series, f"{name}: training loss", "step",
                                 "loss"))
    dev = [r for r in rows if r["split"] == "dev"]
    kind = next((k for k in DEV_PANELS if any(k in r for r in dev)), None)
    if kind:
        panels = []
        for ylabel, logy, keys in DEV_PANELS[kind]:
            series = [{"label": label, "x": [r["step"] for r in dev if key in r],
                       "y": [float(r[key]) for r in dev if key in r]} for key, label in keys]
            series = [s for s in series if s["x"]]
            if series:
                panels.append({"ylabel": ylabel, "logy": logy, "series": series})
        written.append(figure(os.path.join(out, "dev.png"), panels, f"{name}: dev set", "step"))
    # A Figure is a web of reference cycles (about 7,500 objects for these two) that in a training process only
    # Python's rare full collection frees, some 1,000 steps later: meanwhile they fill the heap (docs/results.md,
    # "Memory over long runs"). Free them now; they become garbage only after a first pass.
    for _ in range(3):
        if not gc.collect():
            break
    return written


# --------------------------------------------------------------------------- decoding settings compared


def _decoding_group(row: dict) -> str:
    """The legend label of a compare row: its checkpoint's run, and for DiffuSeq the kind of step grid
    (``uniform``, which includes the full chain, or ``adp``), so that a line joins one model's decodings
    on one kind of grid."""
    ckpt = os.path.normpath(row.get("checkpoint") or "decodings")
    head, last = os.path.split(ckpt)
    label = os.path.basename(ckpt)
    if os.path.basename(head) == "checkpoints":
        run = os.path.basename(os.path.dirname(head))
        label = run if last == "best" else f"{run} ({last})"
    if row.get("process") == "gaussian":
        label += " adp" if (row.get("decode_respacing") or "").startswith("adp") else " uniform"
    return label


def compare_plot(path: str, rows: list[dict], metrics: list[str], title: str = "quality against decoding steps") -> str:
    """One panel per metric, against network calls per sequence (log x): a line per checkpoint and kind of
    step grid (``_decoding_group``), through the rows of ``compute_metric.py --mode compare``."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_decoding_group(r), []).append(r)
    panels = []
    for m in metrics:
        series = []
        for label, rs in groups.items():
            pts = sorted((float(r["calls_per_sequence"]), float(r[m])) for r in rs)
            series.append({"label": label, "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
        panels.append({"ylabel": METRIC_NAMES.get(m, m), "series": series})
    return figure(path, panels, title, "network calls per sequence (decoding steps)", logx=True)


# --------------------------------------------------------------------------- samplers compared


FRONTIER_METRICS = {"forbidden_fraction": "samples with a forbidden transition", "bigram_tv": "bigram TV distance",
                    "slot_accuracy": "slot accuracy", "exact_match": "exact match"}


def frontier_series(rows: list[dict], metrics: list[str]) -> list[list[dict]]:
    """Per metric, a series ``{"label", "x", "y"}`` per sampler line (in the rows' order), its points sorted by
    calls; non-finite values (and non-positive calls, off a log axis) are left out."""
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(r["line"], []).append(r)
    panels = []
    for m in metrics:
        series = []
        for label, rs in lines.items():
            pts = sorted((float(r["calls"]), float(r[m])) for r in rs if isinstance(r.get(m), (int, float))
                         and math.isfinite(float(r[m])) and float(r["calls"]) > 0)
            series.append({"label": label, "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
        panels.append(series)
    return panels


def frontier_plot(path: str, rows: list[dict], metrics: list[str], title: str,
                  hlines: dict[str, list[dict]] | None = None) -> str:
    """Quality against cost: one panel per metric (failure rates first, as the caller orders them), a line per
    sampler through its settings (``frontier_series``), x = network calls per sequence on a log axis. ``rows``:
    ``{"line", "calls", metric: value}``; ``hlines``: per metric, dashed reference levels ``{"label", "y"}``
    (held-out text, a baseline). Many lines: 20 colours, marker shapes, one legend beside the first panel."""
    from matplotlib import colormaps
    Figure, Canvas = _figure_class()
    fig = Figure(figsize=(9.6, 1.0 + 3.2 * len(metrics)), dpi=110)
    Canvas(fig)
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    handles = {}
    for ax, m, series in zip(axes, metrics, frontier_series(rows, metrics)):
        for i, s in enumerate(series):
            ax.plot(s["x"], s["y"], "-", marker="os^Dv<>ph*"[i % 10], ms=4, linewidth=1.2,
                    color=colormaps["tab20"](i % 20), label=s["label"])
        for h in (hlines or {}).get(m) or []:
            ax.axhline(h["y"], color="black", linestyle="--", linewidth=1, label=h["label"])
        ax.set_xscale("log", base=2)
        ax.set_ylabel(FRONTIER_METRICS.get(m, m))
        ax.grid(alpha=0.3)
        handles |= {lab: h for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in handles}
    axes[0].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[0].set_title(title, fontsize=10)
    axes[-1].set_xlabel("network calls per sequence")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version: same input, same bytes
    return write_bytes_atomic(path, buf.getvalue())
