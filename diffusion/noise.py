"""Random draws that belong to a sample, not to a batch: a sample depends only on (seed, sample index, settings).

A sampler asks its noise source for the draws of every row of the batch at once:

* ``uniform(k, stream, L)`` -> [B, L] float64 in (0, 1): one number per canvas position at step ``k``;
* ``normal(shape, dtype)`` -> [B, *shape]: the next standard normals of each row (the Gaussian process).

:class:`SampleNoise` makes them functions of ``(seed, sample index, k, stream, position)`` (and of the block, for
a semi-autoregressive sample made in blocks): uniforms come from a
counter-based hash (murmur3's 32-bit finaliser, chained over the keys; no state, the same on every device), and
normals from one ``torch.Generator`` per sample, seeded from the same hash and drawn in the same order whatever
batch the sample lands in. So the draws of sample i do not depend on the batch size, the batch's other rows, the
canvas width or the number of ranks. :class:`BatchNoise` wraps a plain ``torch.Generator`` (draws for the batch
as a whole, as before): what ``sample(..., generator=g)`` gets.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9

# what a draw is for: a sampler draws each stream at most once per step, so no two draws share a counter
STREAM_UNMASK, STREAM_TOKEN, STREAM_ORDER, STREAM_REMASK, STREAM_EVENT, STREAM_COUNT = range(6)
STREAM_NORMAL = 16
BLOCK_KEY = 32  # chained before a semi-autoregressive block's index (block 0 keeps the plain keys)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64 ``x`` in [0, 2^32): in 16-bit halves of c, so no product leaves int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser: a bijection of [0, 2^32) in which every input bit flips every output bit with
    probability about 1/2."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash32(h: torch.Tensor, *keys) -> torch.Tensor:
    """Chain ``keys`` (ints or int64 tensors, broadcast) into the 32-bit hash ``h`` (int64 tensor in [0, 2^32))."""
    for i, key in enumerate(keys):
        key = torch.as_tensor(key, dtype=torch.long, device=h.device) & M32
        h = _fmix32(h ^ _fmix32((key + (i + 1) * GOLDEN) & M32))
    return h


def seed_words(seed: int) -> tuple[int, int]:
    """A seed of any size as two 32-bit keys."""
    seed = int(seed) % 2**64
    return seed & M32, seed >> 32


class SampleNoise:
    """Draws of the rows ``sample_ids`` [B] (their indices in the request) of a run seeded with ``seed``.

    ``block``: the index of a semi-autoregressive block (``runtime.semi_ar``); each block's draws are keyed by
    it too, so no two blocks of a sample share a number, and block 0's are those of a one-canvas sample."""

    def __init__(self, seed: int, sample_ids, device=None, block: int = 0):
        self.seed, self.block = int(seed), int(block)
        self.sample_ids = torch.as_tensor(sample_ids, dtype=torch.long, device=device).reshape(-1)
        self.device = self.sample_ids.device
        lo, hi = seed_words(self.seed)
        self._rows = hash32(torch.zeros_like(self.sample_ids), lo, hi, self.sample_ids)  # [B]
        if self.block:
            self._rows = hash32(self._rows, BLOCK_KEY, self.block)
        self._generators = None

    def __len__(self) -> int:
        return self.sample_ids.numel()

    def rows(self, which: torch.Tensor) -> "SampleNoise":
        """The noise of a subset of the rows (a bool mask or indices)."""
        return SampleNoise(self.seed, self.sample_ids[which.to(self.device)], self.device, self.block)

    def uniform(self, k: int, stream: int, length: int) -> torch.Tensor:
        """[B, length] float64 in (0, 1): position j of row b at step k, 53 random bits each."""
        row = hash32(self._rows, k, stream)[:, None]
        pos = torch.arange(length, device=self.device)[None]
        hi = hash32(row, pos, 0) >> 6    # 26 bits
        lo = hash32(row, pos, 1) >> 5    # 27 bits
        return ((hi * 2**27 + lo).double() + 0.5) / 2**53

    def normal(self, shape, dtype=torch.float32) -> torch.Tensor:
        """The next [B, *shape] standard normals: row b from its own generator (seeded from the seed and its
        sample index), so a row draws the same numbers whatever batch it is in."""
        if self._generators is None:
            keys = hash32(self._rows, STREAM_NORMAL).tolist()
            self._generators = [torch.Generator(device=self.device).manual_seed(int(k)) for k in keys]
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self._generators]) if self._generators else \
            torch.zeros((0, *shape), device=self.device, dtype=dtype)


class BatchNoise:
    """A plain ``torch.Generator`` (or None: torch's global one) behind the same two methods: the draws depend on
    the whole batch."""

    def __init__(self, generator: torch.Generator | None, batch_size: int, device=None):
        self.generator, self.B, self.device = generator, int(batch_size), device

    def __len__(self) -> int:
        return self.B

    def rows(self, which: torch.Tensor) -> "BatchNoise":
        return BatchNoise(self.generator, int(which.sum()) if which.dtype == torch.bool else which.numel(), self.device)

    def uniform(self, k: int, stream: int, length: int) -> torch.Tensor:
        u = torch.rand((self.B, length), dtype=torch.float64, device=self.device, generator=self.generator)
        return u.clamp_min(2.0**-60)  # (0, 1) as SampleNoise's: log(u) stays finite

    def normal(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn((self.B, *shape), dtype=dtype, device=self.device, generator=self.generator)


def as_noise(generator, batch_size: int, device=None):
    """The noise source of a ``sample`` call: a noise source as given (:class:`SampleNoise`, or anything with its
    ``uniform``/``normal``; its rows must be the batch's), or a :class:`BatchNoise` of a ``torch.Generator`` / None."""
    if hasattr(generator, "uniform"):
        if len(generator) != batch_size:
            raise ValueError(f"the noise source has {len(generator)} rows for a batch of {batch_size}")
        return generator
    return BatchNoise(generator, batch_size, device)
