"""Noised targets z = y + sigma * eps of a network block (METHOD.md sections 2-3).

The one entry point used by the cache (`--noise cached`) and by online training, so both draw the
same values from the counter-based generator keyed by (seed, sample index, block, draw). On CUDA
tensors `dbcore.kernels` runs it as one fused kernel; elsewhere its PyTorch reference.
"""

from __future__ import annotations

import torch

from dbcore import rng
from dbcore.kernels import noise_and_input
from dbcore.partition import block_sigma_law


def noised_targets(
    y: torch.Tensor, sample: torch.Tensor, seed: int, block: int, draw: int, model_cfg, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, d), sigma (N,) float32) for clean targets y (N, d) of samples `sample` (N,)."""
    lo, hi, dist = block_sigma_law(model_cfg.sigma_dist, block, model_cfg.num_blocks, model_cfg.gamma)
    z, _, sigma = noise_and_input(y, sample, seed, block, draw, lo, hi, dist, backend)
    return z, sigma


def mix_targets(
    emb: torch.Tensor, labels: torch.Tensor, sample: torch.Tensor, seed: int, block: int, draw: int,
    fraction: float,
) -> torch.Tensor:
    """Clean targets (N, d) with target mixing: for a share `fraction` of samples the target row
    becomes `alpha*E[label] + (1-alpha)*E[other]`, alpha ~ U(0, 1), `other` a random other class;
    the label stays. A block trained alone so meets the ambiguous states that earlier blocks hand
    over at inference (`softmax @ E` of an unsure block) and learns to overrule z with its input.
    Uniforms from the counter-based generator (group MIX_GROUP): reproducible and resumable."""
    y = emb[labels]  # (N, d)
    if fraction <= 0:
        return y
    v = emb.shape[0]
    u = rng.uniforms(sample, seed, block, draw, rng.MIX_GROUP).float()  # (N, 4)
    other = (labels + 1 + (u[:, 2] * (v - 1)).long().clamp(max=v - 2)) % v  # never the label
    alpha = u[:, 1:2]
    mixed = alpha * y + (1 - alpha) * emb[other]
    return torch.where((u[:, 0] < fraction)[:, None], mixed, y)
