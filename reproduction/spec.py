"""What a part of the reproduction is: data that the command line, the runner and the results page read.

A new part is a module with one ``PART = Part(...)`` and one line in ``reproduction/parts.py``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Part:
    key: str                       # the --parts name, e.g. "lm", "glm", "samplers"
    title: str                     # the results page's section heading
    settings: dict                 # {scale: {setting: value}} for this part (merged into the scale's settings)
    run: Callable                  # run(runner, paths, sc) -> dict (JSON-serialisable results of this part)
    render: Callable               # render(results: dict, sc: dict, ctx) -> list[str] markdown lines
    default_scales: tuple = ()     # scales in which the part runs without being named in --parts
    priority: int = 1              # Runner slot priority of its steps
    needs: tuple = ()              # parts whose results render() also reads (e.g. glm reads lm's truth)


@dataclass
class RenderContext:
    """What a part's renderer sees beyond its own results: ``plots``, the folder its figures go in (the page
    embeds them as ``plots/<name>.png``); ``results``, every part's results by key (results.json's parts);
    ``scale``, the scale's name."""
    plots: str
    results: dict = field(default_factory=dict)
    scale: str = ""
