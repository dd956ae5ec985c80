"""Which timesteps a shortened sampling chain visits: pure functions of (T, N).

Every function returns a sorted list of distinct integers in ``[0, T)``; the sampler then uses the
betas recomputed from alphabar at exactly these steps (:meth:`GaussianDiffusion.timesteps` makes them
the sampling grid, :meth:`GaussianDiffusion.posterior_coefficients` the betas).
"""
from __future__ import annotations

# Tang et al. (2023), "Can Diffusion Model Achieve Better Performance in Text Generation? Bridging
# the Gap between Training and Inference!", adaptive decay sampling: the shares of the N steps given
# to the low-, middle- and high-noise thirds of [0, T), as the released `adp` respacing writes them.
ADAPTIVE_DECAY_PROPORTIONS = (0.08400242284240157, 0.36759523570876984, 0.5484023414488285)


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
    """``adp_N`` (Tang et al. 2023, adaptive decay sampling), exactly as the released ``space_timesteps``
    computes it for every T and N.

    ``[0, T)`` is cut into three integer sections, low noise first, of ``T // 3`` steps each, the first
    ``T % 3`` sections one longer (667/667/666 at T = 2000). Section i gets ``c_i`` steps, with
    ``c0 = max(round(p0 N), 1) + 1``, ``c1 = max(round(p1 N), 1) + 1`` and ``c2 = N - (c0 - 1) - (c1 - 1)``
    (``p`` = ``ADAPTIVE_DECAY_PROPORTIONS``): ``start + round(x)`` for ``x = 0, s, 2s, ...`` accumulated
    in floating point, ``s = (size - 1) / (c_i - 1)``, rounded half to even; the first two sections drop
    their top step (the section's last index, so no step is shared). Few steps go to low noise, most to
    high noise. For T = 2000 this gives the sets of docs/algorithms.md §3.3, e.g. ``adp_4 = [0, 667, 1334, 1999]``;
    at T = 1000, ``adp_4 = [0, 334, 667, 999]``.

    A section shorter than its count is an error, as in the release. N < 4 is an error here: the
    released sets for N = 2, 3 do not reach step T - 1 (the top section gets 0 or 1 step).
    """
    _check(T, n, f"adp_{n}")
    if n < 4:
        raise ValueError(f"adp_{n}: need at least 4 steps (with fewer, the released sets do not reach step T-1)")
    p0, p1, _ = ADAPTIVE_DECAY_PROPORTIONS
    c0 = max(round(p0 * n), 1) + 1
    c1 = max(round(p1 * n), 1) + 1
    counts = (c0, c1, n - (c0 - 1) - (c1 - 1))
    steps, start = [], 0
    for i, count in enumerate(counts):
        size = T // 3 + (1 if i < T % 3 else 0)
        if size < count:
            raise ValueError(f"adp_{n}: T={T} is too small: a section of {size} steps cannot hold {count}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        x, section = 0.0, []
        for _ in range(count):
            section.append(start + round(x))
            x += stride  # accumulated, as released: x = k * stride can round the other way
        steps += sorted(section)[:-1] if i < 2 else section
        start += size
    out = sorted(set(steps))
    assert len(out) == n, (T, n, out)
    return out


def parse_respacing(spec: str | None, T: int) -> list[int]:
    """``full`` (or None): all T steps; ``uniform_N``; ``adp_N``; or an explicit list ``"0,500,1999"``.

    The explicit list must hold distinct integers in ``[0, T)`` and include 0 (the last, noise-free step).
    An empty spec is an error, not ``full``: it is more likely a lost shell variable than a choice.
    """
    spec = "full" if spec is None else spec.strip()
    if not spec:
        raise ValueError("the respacing is empty: use full, uniform_N, adp_N or a comma-separated list of steps "
                         "(or leave it out for full)")
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
