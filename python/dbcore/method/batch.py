"""The types a recipe trades in: a batch, its noise and the draws a sample needs.

A `Batch` is a dict of tensors on the training device holding the streamed arrays and `INDEX`
(sample indices, int64). What the stream ships beside them, as numpy: `EPS` and `UNIFORMS`, the
counter-based draws of online noise (`dbcore.method.rng`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INDEX = "index"  # the batch key holding the sample indices (int64)
EPS = "eps"  # online noise: (B, gaussians) float64 standard normals
UNIFORMS = "uniforms"  # online noise: (B, uniforms) float64 uniforms in (0, 1); column 0 picks sigma

Batch = dict[str, torch.Tensor]
Frozen = dict[str, torch.Tensor]  # non-trainable arrays of the store a model needs (e.g. E)
SigmaLaw = tuple[float, float, str]  # (lo, hi, in-block distribution), see partition.block_sigma_law


@dataclass(frozen=True)
class NoiseRequest:
    """Counter-based draws per sample: `gaussians` standard normals (the target's elements) and
    `uniforms` uniforms, of which uniform 0 always picks sigma (`dbcore.method.rng`)."""

    gaussians: int
    uniforms: int = 1


@dataclass
class Noised:
    """One batch's noise for a block: z = y + sigma * eps (N, ...), sigma (N,), uniforms (N, U)."""

    z: torch.Tensor
    sigma: torch.Tensor
    uniforms: torch.Tensor | None = None
