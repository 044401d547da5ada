"""Noised targets z = y + sigma * eps for a block, from the counter-based generator (METHOD.md 2-3).

PyTorch reference used by the cache and by online training on CPU; `dbcore.kernels` fuses the same
computation on CUDA.
"""

from __future__ import annotations

import torch

from dbcore import rng
from dbcore.partition import sample_sigma_for_block


def noised_targets(
    y: torch.Tensor, sample: torch.Tensor, seed: int, block: int, draw: int, model_cfg
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, d) float32, sigma (N,) float32) for clean targets y (N, d) of samples `sample` (N,)."""
    u = rng.uniform_for_sigma(sample, seed, block, draw)  # (N,)
    sigma = sample_sigma_for_block(u, block, model_cfg.num_blocks, model_cfg.gamma, model_cfg.sigma_dist)
    eps = rng.gaussian(sample, y.shape[1], seed, block, draw)  # (N, d)
    z = y.to(torch.float64) + sigma[:, None] * eps
    return z.float(), sigma.float()
