"""Euler sampler over the blocks, one block in memory at a time (METHOD.md section 6).

Blocks run in network order 0..B-1 (high to low noise) over `dbcore.partition.euler_schedule`:
block b is loaded, takes all of its steps on every batch, and is released before block b+1 loads.
Step: `z <- z + (s_next - s) * (z - D_hat) / s` with `D_hat = softmax(logits) @ E` (target space).
The prediction is the logits of the last step (num_steps network evaluations in total), or with
decode="product" the sum over every step of log softmax(logits): a product of the blocks' beliefs,
at no extra cost (this project's option, not the paper's).

Initial noise: `z = sigma_max * eps`, eps from `dbcore.rng.gaussian` keyed by (seed, sample index,
block = B, draw = 0). Block id B belongs to no network block (those are 0..B-1), so the initial
noise never coincides with training noise drawn for a block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dbcore import rng
from dbcore.edm import SIGMA_MAX
from dbcore.partition import euler_schedule
from dbcore.recipes.vit import ViTBlock, ViTConfig

LoadBlock = Callable[[int], ViTBlock]
DECODES: tuple[str, ...] = ("last", "product")


def initial_noise(sample: torch.Tensor, dim: int, num_blocks: int, seed: int) -> torch.Tensor:
    """z = sigma_max * eps, (N, d) float32, eps keyed by (seed, sample, block=B, draw=0)."""
    eps = rng.gaussian(sample, dim, seed, block=num_blocks, draw=0)  # (N, d) float64
    return (SIGMA_MAX * eps).float()


def _run(
    load_block: LoadBlock,
    x: torch.Tensor,
    cfg: ViTConfig,
    num_steps: int,
    num_run: int,
    batch_size: int,
    seed: int,
    sample_index: torch.Tensor | None,
    decode: str = "last",
    trace: list[dict[str, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run blocks 0..num_run-1 over all samples; returns z (N, d) and the scores (N, V) of
    `decode`: the last logits, or the sum of every step's log-softmax. With `trace`, appends per
    block {"last": its last step's logits, "product": the running sum so far} (N, V) each."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    steps = euler_schedule(cfg.num_blocks, num_steps)
    n = len(x)
    sample = torch.arange(n) if sample_index is None else sample_index.to(torch.int64)
    z = initial_noise(sample, cfg.dim, cfg.num_blocks, seed)  # (N, d), kept on the CPU
    product = torch.zeros(n, cfg.num_classes)  # running sum of log-softmax over the steps
    last = None
    for b in range(num_run):
        block = load_block(b)
        block.eval()
        device = next(block.parameters()).device
        emb = block.target_embedding.float()  # (V, d)
        mine = [s for s in steps if s.block == b]
        last = torch.empty(n, cfg.num_classes)
        with torch.no_grad():
            for i in range(0, n, batch_size):
                xb = x[i : i + batch_size].to(device)
                zb = z[i : i + batch_size].to(device)  # (n_b, d)
                for s in mine:
                    sigma = torch.full((len(xb),), s.sigma, device=device)
                    _, lg = block(xb, zb, sigma)  # (n_b, V)
                    d_hat = torch.softmax(lg.float(), dim=-1) @ emb  # (n_b, d), in target space
                    zb = zb + (s.sigma_next - s.sigma) / s.sigma * (zb - d_hat)
                    product[i : i + batch_size] += torch.log_softmax(lg.float(), dim=-1).cpu()
                z[i : i + batch_size] = zb.cpu()
                last[i : i + batch_size] = lg.float().cpu()
        if trace is not None:
            trace.append({"last": last.clone(), "product": product.clone()})
        del block, emb  # release block b before loading block b+1
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return z, (product if decode == "product" else last)


def sample_labels(
    load_block: LoadBlock,
    x: torch.Tensor,
    cfg: ViTConfig,
    num_steps: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    sample_index: torch.Tensor | None = None,
    decode: str = "last",
    trace: list[dict[str, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels (N,) and scores (N, V) for images x (N, C, H, W) in [0, 1]: the last
    step's logits (decode="last", METHOD.md 6) or the sum of every step's log-softmax ("product").
    `trace` (a list) receives each block's scores along the chain, see `_run`.

    load_block(b) returns block b ready to run (on its device); it is called once per block, in
    order, and the sampler keeps no reference after the block's steps. num_steps defaults to one
    per block. sample_index (N,) keys the initial noise (default arange(N)).
    """
    num_steps = cfg.num_blocks if num_steps is None else num_steps
    _, scores = _run(load_block, x, cfg, num_steps, cfg.num_blocks, batch_size, seed, sample_index, decode,
                     trace)
    assert scores is not None
    return scores.argmax(dim=1), scores


def chain_states(
    load_block: LoadBlock,
    x: torch.Tensor,
    cfg: ViTConfig,
    num_steps: int | None,
    upto_block: int,
    batch_size: int = 256,
    seed: int = 0,
    sample_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, d), sigma (N,)) float32 that blocks < upto_block hand to block `upto_block`.

    The same states the sampler produces with the same arguments: sigma is the first level of
    block upto_block's steps (sigma_max and the initial noise for upto_block = 0; sigma_min after
    the last block for upto_block = B). Only blocks 0..upto_block-1 are loaded.
    """
    num_steps = cfg.num_blocks if num_steps is None else num_steps
    if not 0 <= upto_block <= cfg.num_blocks:
        raise ValueError(f"upto_block {upto_block} is outside 0..{cfg.num_blocks}")
    steps = euler_schedule(cfg.num_blocks, num_steps)
    level = next((s.sigma for s in steps if s.block == upto_block), steps[-1].sigma_next)
    z, _ = _run(load_block, x, cfg, num_steps, upto_block, batch_size, seed, sample_index)
    return z, torch.full((len(x),), level, dtype=torch.float32)
