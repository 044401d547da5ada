"""Chain states for sequential training: the z that trained blocks < b actually hand to block b.

Stored per block in `RUN/chain/block{b}.zarr` with a fingerprint of the checkpoints that produced
them; states from other checkpoints are refused, never silently reused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from dbcore import checkpoint, layout, store
from dbcore.config import Config
from dbcore.sampler import chain_states
from dbcore.train import RunError, images_to_tensor, load_trained_block, read_target_embedding


def fingerprint(run: Path, upto_block: int) -> str:
    """sha256 over the tensor-file digests of blocks 0..upto_block-1."""
    h = hashlib.sha256()
    for b in range(upto_block):
        meta = checkpoint.load_meta(run / f"block{b}")
        if not meta.get("done"):
            raise RunError(f"run {run}: block {b} must finish before block {upto_block} trains sequentially")
        h.update(meta["sha256"].encode())
    return h.hexdigest()


def chain_states_for(
    cfg: Config, store_path: Path, run: Path, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, d), sigma (N,)) handed to `block` by the trained earlier blocks, cached in the run."""
    fp = fingerprint(run, block)
    path = run / "chain" / f"block{block}.zarr"
    if path.exists():
        s = store.open(path)
        if s.attrs.get("fingerprint") != fp:
            raise RunError(
                f"{path}: chain states come from other checkpoints of blocks < {block} "
                f"(fingerprint {s.attrs.get('fingerprint', '?')[:12]} vs {fp[:12]}); delete it to recompute"
            )
        return torch.from_numpy(s.read("z", slice(None))), torch.from_numpy(s.read("sigma", slice(None)))
    cache = store.open(store_path)
    emb = read_target_embedding(cache)
    z, sigma = chain_states(
        lambda b: load_trained_block(run, cfg, b, emb),
        images_to_tensor(cache.read(layout.IMAGES), torch.device("cpu")),
        cfg.model,
        num_steps=cfg.train.inference_steps or cfg.model.num_blocks,
        upto_block=block,
        batch_size=max(256, cfg.train.batch_size),
        seed=cfg.train.seed,
    )
    s = store.create(path, attrs={"fingerprint": fp, "upto_block": block}, overwrite=False)
    s.write_array("z", z.float().numpy())
    s.write_array("sigma", sigma.float().numpy())
    s.finalize()
    return z.float(), sigma.float()
