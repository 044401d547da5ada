"""Euler (or Heun) sampler over the blocks, one block in memory at a time (METHOD.md section 6).

Blocks run in network order 0..B-1 (high to low noise) over `dbcore.method.partition.euler_schedule`:
block b is loaded, takes all of its steps on every batch, and is released before block b+1 loads.
Step: `z <- z + (s_next - s) * (z - D_hat) / s` with D_hat in target space from the recipe's
`denoise_step` (softmax(logits) @ E for a discrete target, the guided D for a generator).
`heun=True` adds EDM's second-order correction with the same block at s_next (this project's
option, not the paper's). Trap: on this equal-CDF grid the first steps span large ratios (80 -> 5
at 20 steps), where the correction amplifies the denoiser's error; it diverged on MNIST
(benches/results/dit_mnist_steps.md). EDM pairs Heun with small-ratio grids.
An end-to-end denoiser samples with the same code as one block
(`num_blocks=1`).

Initial noise: `z = sigma_max * eps`, eps from `dbcore.method.rng.gaussian` keyed by (seed, sample index,
block = B, draw = 0). Block id B belongs to no network block (those are 0..B-1), so the initial
noise never coincides with training noise drawn for a block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dbcore.method import rng
from dbcore.method.edm import SIGMA_MAX
from dbcore.method.partition import euler_schedule

LoadBlock = Callable[[int], nn.Module]
# observe(block, rows, step, readout): called after every step with the recipe's readout
DECODES: tuple[str, ...] = ("last", "product")  # discrete readouts: last logits or product of beliefs
Observe = Callable[[int, slice, int, "torch.Tensor | None"], None]


def initial_noise(sample: torch.Tensor, shape: tuple[int, ...], num_blocks: int, seed: int) -> torch.Tensor:
    """z = sigma_max * eps, (N, *shape) float32, eps keyed by (seed, sample, block=B, draw=0)."""
    numel = int(torch.tensor(shape).prod()) if shape else 1
    eps = rng.gaussian(sample, numel, seed, block=num_blocks, draw=0)  # (N, numel) float64
    return (SIGMA_MAX * eps).float().view(len(sample), *shape)


def _take(cond: dict[str, torch.Tensor], rows: slice, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v[rows].to(device) for k, v in cond.items()}


def run_chain(
    recipe,
    load_block: LoadBlock,
    cond: dict[str, torch.Tensor],
    z: torch.Tensor,
    num_blocks: int,
    num_steps: int,
    upto_block: int | None = None,
    batch_size: int = 256,
    options: dict | None = None,
    observe: Observe | None = None,
    heun: bool = False,
    block_done: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run blocks 0..upto_block-1 (all by default) from the states z (N, ...) (kept on the CPU)
    with conditioning `cond` (tensors with N rows); returns the final z.

    load_block(b) returns block b ready to run (on its device); it is called once per block, in
    order, and no reference is kept after the block's steps. `block_done(b)` runs after block b
    has taken its steps on every sample.
    """
    steps = euler_schedule(num_blocks, num_steps)
    upto = num_blocks if upto_block is None else upto_block
    options = options or {}
    z = z.clone()
    n = len(z)
    for b in range(upto):
        block = load_block(b)
        block.eval()
        device = next(block.parameters()).device
        mine = [(i, s) for i, s in enumerate(steps) if s.block == b]
        with torch.no_grad():
            for start in range(0, n, batch_size):
                rows = slice(start, min(n, start + batch_size))
                cb = _take(cond, rows, device)
                zb = z[rows].to(device)
                for i, s in mine:
                    sigma = torch.full((len(zb),), s.sigma, device=device)
                    d_hat, readout = recipe.denoise_step(block, cb, zb, sigma, options)
                    slope = (zb - d_hat) / s.sigma  # dz/dsigma of the probability-flow ODE
                    z_next = zb + (s.sigma_next - s.sigma) * slope
                    if heun:  # EDM Algorithm 1's correction, the same block at s_next
                        sigma_next = torch.full_like(sigma, s.sigma_next)
                        d_next, _ = recipe.denoise_step(block, cb, z_next, sigma_next, options)
                        slope_next = (z_next - d_next) / s.sigma_next
                        z_next = zb + (s.sigma_next - s.sigma) * 0.5 * (slope + slope_next)
                    zb = z_next
                    if observe is not None:
                        observe(b, rows, i, readout)
                z[rows] = zb.to(z.device, z.dtype)
        del block  # release block b before loading block b+1
        if block_done is not None:
            block_done(b)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return z


def level_before(num_blocks: int, num_steps: int, upto_block: int) -> float:
    """The sigma at which block `upto_block` receives the chain's state (sigma_max for block 0,
    the last level for upto_block = B)."""
    steps = euler_schedule(num_blocks, num_steps)
    return next((s.sigma for s in steps if s.block == upto_block), steps[-1].sigma_next)
