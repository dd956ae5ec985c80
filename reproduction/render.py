"""The results page, drawn from results.json alone: small table renderers that the parts' ``render`` use,
the statistics their verdicts need, and the page that puts the parts' sections together."""
from __future__ import annotations

import json
import math
import os
import statistics

# results.json's keys that are not a part's results
META_KEYS = ("layout", "scale", "settings", "seconds", "cpu_count", "notes")


def num(x) -> float:
    """A stored number, NaN where results.json has none (null: no finite value)."""
    return math.nan if x is None else float(x)


def pct(x, digits: int = 1) -> str:
    return f"{100 * num(x):.{digits}f}%"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table: the header, the rule, and one line per row (each cell as ``str`` gives it)."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
            ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def verdict(ok: bool, yes: str = "holds", no: str = "not reached") -> str:
    return f"**{yes if ok else no}**"


def plot(ctx, name: str, alt: str, series: list[dict] | None, title: str, xlabel: str, ylabel: str,
         hlines: list[dict] | None = None, logx: bool = False) -> list[str]:
    """Draw ``<plots>/<name>.png`` (``evaluation.plots.line_plot``) and embed it. ``series`` None: the data
    was not kept (a record converted from an older layout), so an existing figure is embedded as it is."""
    path = os.path.join(ctx.plots, f"{name}.png")
    if series is None:
        return [f"![{alt}](plots/{name}.png)", ""] if os.path.exists(path) else []
    from evaluation.plots import line_plot
    os.makedirs(ctx.plots, exist_ok=True)
    line_plot(path, series, title, xlabel, ylabel, hlines=hlines, logx=logx)
    return [f"![{alt}](plots/{name}.png)", ""]


# --------------------------------------------------------------------------- statistics over seeds


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std of per-seed ``values``, or of a stored summary ``{"mean", "std", "n"}`` (a record
    whose per-seed values were not kept)."""
    if isinstance(values, dict):
        return values["mean"], values["std"]
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def count(values) -> int:
    return values["n"] if isinstance(values, dict) else len(values)


def fmt_ms(values, digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if count(values) > 1 else f"{m:.{digits}f}"


def apart(a, b) -> bool:
    """No seed of one lies within the other's range (a stored summary says so in ``apart``)."""
    if isinstance(a, dict) or isinstance(b, dict):
        return bool((a if isinstance(a, dict) else b).get("apart"))
    return max(a) < min(b) or max(b) < min(a)


def direction(diff: float, spread: float, seeds: int, claim: bool, apart: bool = False) -> str:
    """Whether a variant's bound is worse than the base's (``diff`` > 0) beyond twice the seed-to-seed
    ``spread``; ``apart``: no seed of one lies within the other's range; ``claim``: the paper says worse."""
    word = "worse" if diff > 0 else "better"
    verdict_ = (": holds" if diff > 0 else ": does not hold") if claim else ""
    if seeds < 2:
        return f"{word} (one seed: no spread to judge by)"
    if abs(diff) <= 2 * spread:
        if apart:
            return f"{word} in every seed{verdict_}, but the spread is large (std {spread:.3f})"
        return f"no clear difference ({diff:+.3f} is within 2 x std {spread:.3f})"
    size = f"{abs(diff) / spread:.0f}x std" if spread > 0 else "std 0"
    return f"{word}{verdict_} ({size})"


def compare(values, base, claim: bool) -> tuple[float, str]:
    """``values`` against ``base`` (per seed, or stored summaries): the difference of the means and its
    verdict (``direction``)."""
    (m, s), (mb, sb) = mean_std(values), mean_std(base)
    diff = m - mb
    return diff, direction(diff, max(s, sb), count(values), claim, apart(values, base))


# --------------------------------------------------------------------------- the page


def page(doc: dict, parts: list, plots: str) -> str:
    """results.md from results.json (``doc``): the header, then each part in ``parts`` (the registry's order)
    that has results, under its title, with its note (a record's provenance) and its renderer's lines."""
    from .spec import RenderContext
    scale, sc = doc["scale"], doc["settings"]
    results = {k: v for k, v in doc.items() if k not in META_KEYS}
    ctx = RenderContext(plots=plots, results=results, scale=scale)
    lines = [f"# Does it learn? (`bash run.sh reproduce{' quick' if scale == 'quick' else ''}`)", ""]
    lines += [*doc.get("notes", []), ""] if doc.get("notes") else []
    wall = ("" if doc.get("seconds") is None else
            f"{doc['seconds'] / 60:.1f} min of wall time for the steps run in the last invocation; ")
    lines += [f"Scale `{scale}`; {wall}{doc.get('cpu_count')} CPU cores. Settings: `{json.dumps(sc)}`.", ""]
    for part in parts:
        if part.key not in results:
            continue
        lines += [f"## {part.title}", ""]
        note = results[part.key].get("note")
        lines += [*note, ""] if note else []
        lines += part.render(results[part.key], sc, ctx)
    return "\n".join(lines) + "\n"
