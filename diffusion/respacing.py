"""Which timesteps a shortened sampling chain visits: pure functions of (T, N).

Every function returns a sorted list of distinct integers in ``[0, T)``; the sampler then uses the
betas recomputed from alphabar at exactly these steps (:meth:`GaussianDiffusion.respace`).
"""
from __future__ import annotations

# Tang et al. (2023), "Can Diffusion Model Achieve Better Performance in Text Generation? Bridging
# the Gap between Training and Inference!", adaptive decay sampling: the shares of the N steps given
# to the low-, middle- and high-noise thirds of [0, T) (the released `adp` respacing).
ADAPTIVE_DECAY_PROPORTIONS = (0.08400, 0.36760, 0.54840)


def _check(T: int, n: int, name: str) -> None:
    if n < 2:
        raise ValueError(f"{name}: need at least 2 sampling steps, got {n}")
    if n > T:
        raise ValueError(f"{name}: {n} sampling steps exceed the T={T} diffusion steps")


def _linspace_int(lo: float, hi: float, count: int) -> list[int]:
    """``count`` evenly spaced points from ``lo`` to ``hi`` inclusive, rounded half to even (``np.round``)."""
    if count == 1:
        return [round(lo)]
    return [round(lo + (hi - lo) * i / (count - 1)) for i in range(count)]


def uniform_timesteps(T: int, n: int) -> list[int]:
    """``uniform_N``: N evenly spaced steps from 0 to T-1, both ends included."""
    _check(T, n, f"uniform_{n}")
    return sorted(set(_linspace_int(0, T - 1, n)))


def adaptive_decay_timesteps(T: int, n: int) -> list[int]:
    """``adp_N`` (Tang et al. 2023, adaptive decay sampling).

    ``[0, T)`` is cut into three equal segments, low noise first. Segment i gets ``c_i`` evenly spaced
    steps including both its ends, with ``c0 = max(round(p0 N), 1) + 1``, ``c1 = max(round(p1 N), 1) + 1``
    and ``c2 = N - (c0 - 1) - (c1 - 1)``; the top step of the first two segments is dropped because
    it is the bottom step of the next one. Few steps go to low noise, most to high noise. Points are
    rounded half to even. For T = 2000 this gives the reference sets of ALGORITHMS.md §3, e.g.
    ``adp_4 = [0, 667, 1334, 1999]``.
    """
    _check(T, n, f"adp_{n}")
    p0, p1, _ = ADAPTIVE_DECAY_PROPORTIONS
    c0 = max(round(p0 * n), 1) + 1
    c1 = max(round(p1 * n), 1) + 1
    c2 = n - (c0 - 1) - (c1 - 1)
    if c2 < 2:
        raise ValueError(f"adp_{n}: too few steps for the three segments (need N >= 4)")
    # The thirds of [0, T) have real-valued ends T/3 and 2T/3; the last third starts at the first
    # integer step above 2T/3 and ends at T - 1. This reproduces the released sets exactly.
    b1, b2 = T / 3, 2 * T / 3
    steps = (_linspace_int(0, b1, c0)[:-1] + _linspace_int(b1, b2, c1)[:-1]
             + _linspace_int(-(-2 * T // 3), T - 1, c2))
    out = sorted(set(steps))
    if len(out) != n:
        raise ValueError(f"adp_{n}: T={T} is too small to place {n} distinct steps")
    return out


def parse_respacing(spec: str | None, T: int) -> list[int]:
    """``full`` (or empty): all T steps; ``uniform_N``; ``adp_N``; or an explicit list ``"0,500,1999"``.

    The explicit list must hold distinct integers in ``[0, T)`` and include 0 (the last, noise-free step).
    """
    spec = (spec or "full").strip()
    if spec == "full":
        return list(range(T))
    for prefix, fn in (("uniform_", uniform_timesteps), ("adp_", adaptive_decay_timesteps)):
        if spec.startswith(prefix):
            try:
                n = int(spec[len(prefix):])
            except ValueError:
                raise ValueError(f"respacing {spec!r}: expected {prefix}N with an integer N") from None
            return fn(T, n)
    try:
        steps = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"respacing {spec!r}: use full, uniform_N, adp_N or a comma-separated list of steps") from None
    if len(set(steps)) != len(steps):
        raise ValueError(f"respacing {spec!r}: repeated steps")
    if not steps or min(steps) != 0 or max(steps) >= T:
        raise ValueError(f"respacing {spec!r}: steps must lie in [0, {T}) and include 0")
    return sorted(steps)
