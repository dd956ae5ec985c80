"""Small statistics shared by the metrics."""
from __future__ import annotations

import math


def ratio_standard_error(x: list[float], n: list[float]) -> float:
    """Standard error of ``sum(x) / sum(n)`` over examples ``i`` (the delta method for a ratio of
    means): ``std(x_i - r n_i) / sqrt(N) / mean(n)`` with ``r = sum(x) / sum(n)`` and the sample standard
    deviation (N - 1); 0 for fewer than two examples."""
    if len(x) != len(n):
        raise ValueError(f"{len(x)} values but {len(n)} counts")
    if len(x) < 2:
        return 0.0
    r = sum(x) / sum(n)
    resid = [a - r * b for a, b in zip(x, n)]
    mean = sum(resid) / len(resid)
    var = sum((e - mean) ** 2 for e in resid) / (len(resid) - 1)
    return math.sqrt(var) / math.sqrt(len(x)) / (sum(n) / len(n))
