"""What the processes' ``step`` and ``sample`` return, shared by the absorbing and the Gaussian process.

A sampling loop calls the network, then ``out = process.step(model_output, t, s, x_t, ...)``, and
continues from ``out.prev_sample``; ``step`` never calls the network (as diffusers' schedulers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    prev_sample: torch.Tensor                # x_s [B, L] (absorbing) or z_s [B, L, D] (Gaussian)
    x0_tokens: torch.Tensor | None = None    # Gaussian with clamping: the tokens of the clamped x0_hat at
                                             # the N noised positions, [N] long, row-major; else None
    x0_hat: torch.Tensor | None = None       # Gaussian: the (clamped) x0 prediction the step used, [B, L, D]
                                             # (a multistep solver's history)


@dataclass
class SampleOutput:
    x0: torch.Tensor                         # [B, L] generated tokens
    network_calls: int                       # batched denoiser invocations
    row_evaluations: int                     # sequences passed through the denoiser, summed over calls
    z0: torch.Tensor | None = None           # Gaussian: [B, L, D] final continuous sample; absorbing: None
