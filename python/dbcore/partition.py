"""Equi-probability partition of the noise range and per-block sigma sampling (METHOD.md section 3).

Blocks are indexed in network order: block 0 runs first at inference and owns the *highest* noise.
`block_range` is the one block <-> noise-range mapping used by training and inference alike.
"""

from __future__ import annotations

import math

import torch

from dbcore.edm import P_MEAN, P_STD, SIGMA_MAX, SIGMA_MIN

_SQRT2 = math.sqrt(2.0)


def cdf(sigma: float) -> float:
    """q = Phi((ln sigma - P_mean) / P_std), the CDF of the training log-normal."""
    return 0.5 * (1.0 + math.erf((math.log(sigma) - P_MEAN) / (P_STD * _SQRT2)))


def icdf(q: float) -> float:
    """sigma = exp(P_mean + P_std * Phi^-1(q)), the inverse of `cdf`."""
    z = float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))
    return math.exp(P_MEAN + P_STD * z)


def boundaries(num_blocks: int) -> list[float]:
    """B+1 boundaries, low to high noise; each interval carries 1/B of the truncated mass."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    q_min, q_max = cdf(SIGMA_MIN), cdf(SIGMA_MAX)
    inner = [icdf(q_min + b / num_blocks * (q_max - q_min)) for b in range(1, num_blocks)]
    return [SIGMA_MIN, *inner, SIGMA_MAX]


def block_range(block: int, num_blocks: int, gamma: float = 0.05) -> tuple[float, float]:
    """(lo, hi) sigma range of network block `block`, widened by gamma in log space and clipped."""
    if not 0 <= block < num_blocks:
        raise ValueError(f"block {block} is outside 0..{num_blocks - 1}")
    edges = boundaries(num_blocks)
    k = num_blocks - 1 - block  # interval index, low to high noise
    log_lo, log_hi = math.log(edges[k]), math.log(edges[k + 1])
    pad = gamma * (log_hi - log_lo)
    lo = max(SIGMA_MIN, math.exp(log_lo - pad))
    hi = min(SIGMA_MAX, math.exp(log_hi + pad))
    return lo, hi


def sample_sigma(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Map uniforms u in (0, 1) to the training log-normal truncated to [lo, hi] (inverse CDF)."""
    q_lo, q_hi = cdf(lo), cdf(hi)
    q = q_lo + u.to(torch.float64) * (q_hi - q_lo)
    return torch.exp(P_MEAN + P_STD * torch.special.ndtri(q))
