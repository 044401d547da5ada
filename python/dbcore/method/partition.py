"""Equi-probability partition of the noise range and per-block sigma sampling (METHOD.md section 3).

Blocks are indexed in network order: block 0 runs first at inference and owns the *highest* noise.
`block_range` is the one block <-> noise-range mapping used by training and inference alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dbcore.method.edm import P_MEAN, P_STD, SIGMA_MAX, SIGMA_MIN

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


# --- in-block sigma distributions ---------------------------------------------------------------

SIGMA_DISTS: tuple[str, ...] = ("lognormal", "loguniform")
# A config may also name a per-block policy (`block_sigma_law`):
#   loguniform-first: block 0 (queried first, at sigma_max, where z carries no label) loguniform,
#                     the others lognormal;
#   top-first:        block 0 trains only at sigma_max, the one level where the one-step-per-block
#                     sampler queries it (it is then a classifier of x alone); the others lognormal;
#   top:              every block trains only at the level where that sampler queries it, the upper
#                     boundary of its range. Both "top" policies fit training to the one-step-per-
#                     block sampler (inference_steps = B); they are this project's, not the paper's.
CONFIG_SIGMA_DISTS: tuple[str, ...] = (*SIGMA_DISTS, "loguniform-first", "top-first", "top")


def block_sigma_law(dist: str, block: int, num_blocks: int, gamma: float = 0.05) -> tuple[float, float, str]:
    """(lo, hi, in-block distribution) that network block `block` draws sigma from under config
    value `dist`; the one mapping used by online sampling, the cache and the kernels."""
    lo, hi = block_range(block, num_blocks, gamma)
    top = boundaries(num_blocks)[num_blocks - block]  # un-widened upper edge: the sampler's level
    if dist == "loguniform-first":
        return lo, hi, "loguniform" if block == 0 else "lognormal"
    if dist == "top-first":
        return (top, top, "loguniform") if block == 0 else (lo, hi, "lognormal")
    if dist == "top":
        return top, top, "loguniform"  # ln sigma uniform on [ln top, ln top]: the point top
    if dist not in SIGMA_DISTS:
        raise ValueError(f"sigma distribution must be one of {CONFIG_SIGMA_DISTS}, got {dist!r}")
    return lo, hi, dist


def sample_sigma_loguniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Map uniforms u in (0, 1) to ln sigma uniform on [ln lo, ln hi]."""
    log_lo, log_hi = math.log(lo), math.log(hi)
    return torch.exp(log_lo + u.to(torch.float64) * (log_hi - log_lo))


def sample_sigma_for_block(
    u: torch.Tensor, block: int, num_blocks: int, gamma: float = 0.05, dist: str = "lognormal"
) -> torch.Tensor:
    """Sigmas (float64) of network block `block` from uniforms u (`dbcore.method.rng.uniform_for_sigma`).

    lognormal: the training log-normal truncated to the widened range (the paper).
    loguniform: uniform in log sigma over the widened range (more mass at the range's ends).
    Per-block policies (loguniform-first, top-first, top): see `block_sigma_law`.
    """
    return sample_sigma_in_range(u, *block_sigma_law(dist, block, num_blocks, gamma))


def sample_sigma_in_range(u: torch.Tensor, lo: float, hi: float, dist: str) -> torch.Tensor:
    """Sigmas (float64) in [lo, hi] from uniforms u under an in-block distribution of SIGMA_DISTS."""
    if dist == "lognormal":
        return sample_sigma(u, lo, hi)
    if dist == "loguniform":
        return sample_sigma_loguniform(u, lo, hi)
    raise ValueError(f"sigma distribution must be one of {SIGMA_DISTS}, got {dist!r}")


# --- Euler sampler schedule ---------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One Euler step `sigma -> sigma_next` taken by network block `block`."""

    block: int
    sigma: float
    sigma_next: float


def block_of_sigma(sigma: float, num_blocks: int) -> int:
    """Network block whose *un-widened* range holds sigma (a boundary goes to the lower block)."""
    edges = boundaries(num_blocks)
    k = sum(1 for e in edges[1:-1] if sigma > e)  # interval index, low to high noise
    return num_blocks - 1 - k


def steps_per_block(num_blocks: int, num_steps: int) -> list[int]:
    """Euler steps per network block, e.g. (B=3, 50 steps) -> [17, 16, 17]; see `euler_schedule`."""
    counts = [0] * num_blocks
    for step in euler_schedule(num_blocks, num_steps):
        counts[step.block] += 1
    return counts


def euler_schedule(num_blocks: int, num_steps: int) -> list[Step]:
    """num_steps Euler steps from sigma_max down to sigma_min, equally spaced in q = cdf(sigma).

    Grid: q_i = q_max - (i / N)(q_max - q_min), i = 0..N (N + 1 points, so N = 1 is one step
    sigma_max -> sigma_min, not a collapse to sigma_min). Step i (q_i -> q_i+1) belongs to the block
    whose un-widened range (`boundaries`) holds the step's midpoint in q; a midpoint exactly on a
    boundary goes to the lower-noise block. Computed in integers: block = floor((2i+1) B / 2N).
    Remainders therefore go to the blocks whose share rounds up: B=3, N=50 -> 17/16/17; N = B gives
    one step per block, each starting at the block's upper boundary. A step may start up to half a
    grid step above its block's un-widened range (the overlap gamma covers it for N >~ 4B).
    N < B raises ValueError: some block would never run.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if num_steps < num_blocks:
        raise ValueError(f"num_steps ({num_steps}) must be >= num_blocks ({num_blocks})")
    q_min, q_max = cdf(SIGMA_MIN), cdf(SIGMA_MAX)
    grid = [SIGMA_MAX]
    grid += [icdf(q_max - i / num_steps * (q_max - q_min)) for i in range(1, num_steps)]
    grid += [SIGMA_MIN]
    return [
        Step((2 * i + 1) * num_blocks // (2 * num_steps), grid[i], grid[i + 1])
        for i in range(num_steps)
    ]


# ----------------------------------------------------------------------------- layers per block


def block_layers(cfg: Any) -> list[int]:
    """Layers of each block in network order; they always sum to depth (no layer is dropped)."""
    if cfg.num_blocks < 1 or cfg.depth < 1:
        raise ValueError(f"need depth >= 1 and num_blocks >= 1, got {cfg.depth}, {cfg.num_blocks}")
    if cfg.layer_split is None:
        if cfg.depth % cfg.num_blocks:
            raise ValueError(
                f"depth {cfg.depth} is not divisible by num_blocks {cfg.num_blocks}; "
                "give layer_split explicitly"
            )
        return [cfg.depth // cfg.num_blocks] * cfg.num_blocks
    split = list(cfg.layer_split)
    if len(split) != cfg.num_blocks or sum(split) != cfg.depth or min(split) < 1:
        raise ValueError(
            f"layer_split {split} must have num_blocks={cfg.num_blocks} entries >= 1 "
            f"summing to depth={cfg.depth}"
        )
    return split


def layers_in_block(cfg: Any, block: int) -> int:
    if not 0 <= block < cfg.num_blocks:
        raise ValueError(f"block {block} is outside 0..{cfg.num_blocks - 1}")
    return block_layers(cfg)[block]
