"""Chain states for sequential training: the z that trained blocks < b actually hand to block b.

Stored per block in `RUN/chain/block{b}.zarr` with a fingerprint of the checkpoints that produced
them; states from other checkpoints are refused, never silently reused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from dbcore.config import Config
from dbcore.data import store
from dbcore.data.frozen import read_frozen
from dbcore.errors import RunError
from dbcore.method.sampler import initial_noise, level_before, run_chain
from dbcore.recipes import for_config
from dbcore.runs import rundir
from dbcore.runs.rundir import load_trained_block


def fingerprint(run: Path, upto_block: int) -> str:
    """sha256 over the tensor-file digests of blocks 0..upto_block-1."""
    h = hashlib.sha256()
    for b in range(upto_block):
        try:
            meta = rundir.done_meta(run, rundir.block_name(b))
        except RunError:
            raise RunError(f"run {run}: block {b} must finish before block {upto_block} trains "
                           "sequentially") from None
        h.update(meta["sha256"].encode())
    return h.hexdigest()


def chain_states_for(
    cfg: Config, cache: store.Store, run: Path, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, ...), sigma (N,)) handed to `block` by the trained earlier blocks, cached in the run;
    `cache`: the run's open cache store."""
    fp = fingerprint(run, block)
    path = rundir.chain_path(run, block)
    if path.exists():
        s = store.open(path)
        if s.attrs.get("fingerprint") != fp:
            raise RunError(
                f"{path}: chain states come from other checkpoints of blocks < {block} "
                f"(fingerprint {s.attrs.get('fingerprint', '?')[:12]} vs {fp[:12]}); delete it to recompute"
            )
        return torch.from_numpy(s.read("z", slice(None))), torch.from_numpy(s.read("sigma", slice(None)))
    recipe = for_config(cfg)
    m, t = cfg.model, cfg.train
    frozen = read_frozen(cache, recipe.frozen_arrays)
    cond = {k: torch.from_numpy(cache.read(k)) for k in recipe.cond_arrays}
    n = len(next(iter(cond.values())))
    steps = t.inference_steps or m.num_blocks
    z0 = initial_noise(torch.arange(n), recipe.target_shape(frozen), m.num_blocks, t.seed)
    z = run_chain(recipe, lambda b: load_trained_block(run, recipe, b, frozen), cond, z0, m.num_blocks,
                  steps, upto_block=block, batch_size=max(256, t.batch_size))
    sigma = torch.full((n,), level_before(m.num_blocks, steps, block), dtype=torch.float32)
    s = store.create(path, attrs={"fingerprint": fp, "upto_block": block}, overwrite=False)
    s.write_array("z", z.float().numpy())
    s.write_array("sigma", sigma.numpy())
    s.finalize()
    return z.float(), sigma
