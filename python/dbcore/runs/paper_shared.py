"""The paper's public-code training layout, kept only for comparison (`dbcore train --paper-shared`).

All blocks live in one model and share everything but their layers (embeddings, z projection,
noise embedder, output layer F, head: whatever the recipe's block holds outside `layers`); one
AdamW holds everything (so weight decay and momentum also move blocks that did not train this step,
METHOD.md section 10) and every step trains one block chosen uniformly at random. Only activation
memory shrinks; blocks cannot train apart. Steps are B times the per-block budget, so each block
sees as many steps as in independent mode. Frozen arrays (a target embedding) stay the cache's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dbcore import checkpoint, rng, rundir, store
from dbcore.config import Config
from dbcore.data import INDEX, BatchStream
from dbcore.kernels import resolve_backend
from dbcore.loop import noise_seed, resolve_device, to_device, train_loop
from dbcore.noise import noised_targets
from dbcore.recipes import for_config
from dbcore.recipes.base import Frozen, Noised, Recipe, read_frozen
from dbcore.rundir import RunError


def _tie_all_but_layers(first: nn.Module, other: nn.Module, layers: nn.Module) -> None:
    """Make `other` use `first`'s modules and parameters everywhere outside `layers`."""
    for name, child in list(other.named_children()):
        if child is layers:
            continue
        if any(m is layers for m in child.modules()):  # holds the layers deeper down: descend
            _tie_all_but_layers(getattr(first, name), child, layers)
        else:
            setattr(other, name, getattr(first, name))
    for name, _ in list(other.named_parameters(recurse=False)):
        setattr(other, name, getattr(first, name))


class SharedBlocks(nn.Module):
    """B blocks of a recipe whose non-layer parts are one set of modules; `blocks[b]` runs block b."""

    def __init__(self, recipe: Recipe, frozen: Frozen) -> None:
        super().__init__()
        n = recipe.model_cfg.num_blocks
        self.blocks = nn.ModuleList(recipe.build_block(b, frozen) for b in range(n))
        for blk in self.blocks[1:]:
            _tie_all_but_layers(self.blocks[0], blk, blk.layers)


def block_of_step(step: int, seed: int, num_blocks: int) -> int:
    """The block trained at `step`: uniform, a pure function of (seed, step) so runs resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(num_blocks, (1,), generator=g))


def train_paper_shared(cfg: Config, store_path: Path, run: Path, progress: bool = True) -> dict:
    m, t = cfg.model, cfg.train
    recipe = for_config(cfg)
    if type(recipe).noise is not Recipe.noise:
        raise RunError(f"--paper-shared: recipe {cfg.recipe!r} does not noise its targets as "
                       "z = y + sigma * eps")
    device = resolve_device(t.device)
    backend = resolve_backend(t.backend, device)
    s = store.open(store_path)
    frozen = read_frozen(s, recipe)
    torch.manual_seed(t.seed)
    model = SharedBlocks(recipe, frozen).to(device)
    frozen = {k: v.to(device) for k, v in frozen.items()}
    loop_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, steps=t.steps * m.num_blocks))
    seed = noise_seed(s)
    stream = BatchStream(store_path, list(recipe.stream_arrays), t.batch_size, seed=t.seed, drop_last=True)
    step_counter = {"step": 0}
    req = recipe.noise_request(recipe.target_shape(frozen))

    def step_loss(b_np: dict[str, np.ndarray]) -> torch.Tensor:
        b = block_of_step(step_counter["step"], t.seed, m.num_blocks)
        step_counter["step"] += 1
        batch = to_device(b_np, recipe.stream_arrays, device)
        draw = stream.epoch
        y = recipe.targets(batch, frozen)
        # the generator's noise of (seed, sample, block, draw = epoch), as online training draws it
        idx = batch[INDEX].cpu()
        z, sigma = noised_targets(y, idx, seed, b, draw, recipe.sigma_law(b), backend)
        uniforms = rng.uniforms_of(idx, req.uniforms, seed, b, draw).to(device)  # as the stream's
        noised = Noised(z, sigma, uniforms)
        y_train = recipe.train_targets(y, batch, frozen, b, draw)
        if y_train is not y:
            noised.z = noised.z + (y_train - y)
        return recipe.block_loss(model.blocks[b], batch, noised, recipe.loss_weights(noised), backend)

    base = rundir.checkpoint_base(run, rundir.SHARED)
    if checkpoint.exists(base):
        step_counter["step"] = int(checkpoint.load_meta(base)["step"])
    return train_loop(rundir.SHARED, model, step_loss, loop_cfg, run, stream, progress)


def load_shared(run: Path, recipe: Recipe) -> SharedBlocks:
    frozen = rundir.frozen_from_checkpoint(run, rundir.SHARED, recipe.frozen_arrays, recipe=recipe.name)
    return rundir.load_model(run, rundir.SHARED, SharedBlocks(recipe, frozen), recipe=recipe.name)
