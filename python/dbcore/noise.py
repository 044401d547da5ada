"""Noised targets z = y + sigma * eps of a network block (METHOD.md sections 2-3).

The one entry point used by the cache (`--noise cached`) and by online training, so both draw the
same values from the counter-based generator keyed by (seed, sample index, block, draw). On CUDA
tensors `dbcore.kernels` runs it as one fused kernel; elsewhere its PyTorch reference.
"""

from __future__ import annotations

import torch

from dbcore.kernels import noise_and_input
from dbcore.partition import block_range, block_sigma_dist


def noised_targets(
    y: torch.Tensor, sample: torch.Tensor, seed: int, block: int, draw: int, model_cfg, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, d), sigma (N,) float32) for clean targets y (N, d) of samples `sample` (N,)."""
    lo, hi = block_range(block, model_cfg.num_blocks, model_cfg.gamma)
    dist = block_sigma_dist(model_cfg.sigma_dist, block)
    z, _, sigma = noise_and_input(y, sample, seed, block, draw, lo, hi, dist, backend)
    return z, sigma
