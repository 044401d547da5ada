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

import torch
from torch import nn

from dbcore.config import Config
from dbcore.data import store
from dbcore.data.frozen import read_frozen
from dbcore.data.stream import BatchStream
from dbcore.errors import RunError
from dbcore.kernels import resolve_backend
from dbcore.method.batch import INDEX, Frozen
from dbcore.recipes import for_config
from dbcore.recipes.base import Recipe
from dbcore.runs import checkpoint, rundir
from dbcore.runs.frozen_module import stream_windows
from dbcore.runs.loop import noise_seed, resolve_device, to_device, train_loop
from dbcore.runs.step import NumpyBatch, augmented, block_noised, block_step_loss, drawn_here


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


def train_paper_shared(cfg: Config, s: store.Store, run: Path, progress: bool = True) -> dict:
    """Train the shared layout from the open cache store `s` (checked by the caller)."""
    m, t = cfg.model, cfg.train
    recipe = for_config(cfg)
    if type(recipe).noise is not Recipe.noise:
        raise RunError(f"--paper-shared: recipe {cfg.recipe!r} does not noise its targets as "
                       "z = y + sigma * eps")
    device = resolve_device(t.device)
    backend = resolve_backend(t.backend, device)
    frozen = read_frozen(s, recipe.frozen_arrays)
    torch.manual_seed(t.seed)
    model = SharedBlocks(recipe, frozen).to(device)
    frozen = {k: v.to(device) for k, v in frozen.items()}
    loop_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, steps=t.steps * m.num_blocks))
    seed = noise_seed(s)
    stream = BatchStream(s, list(recipe.stream_arrays), t.batch_size, seed=t.seed, drop_last=True,
                         window_bytes=cfg.window_bytes(), windows=stream_windows(recipe, s))
    step_counter = {"step": 0}
    req = recipe.noise_request(recipe.target_shape(frozen))

    def step_loss(raw: NumpyBatch) -> torch.Tensor:
        b = block_of_step(step_counter["step"], t.seed, m.num_blocks)
        step_counter["step"] += 1
        draw = stream.epoch
        batch = augmented(recipe, to_device(raw, recipe.stream_arrays, device), t, draw)
        # the generator's noise of (seed, sample, block b, draw = epoch), as online training draws
        # it: the uniforms here (the stream cannot know b), eps and sigma by `Recipe.noise`
        drawn = drawn_here(raw[INDEX], req.uniforms, seed, b, draw)
        noised = block_noised(recipe, drawn, batch, frozen, b, draw, seed, backend)
        return block_step_loss(recipe, model.blocks[b], batch, noised, backend)

    base = rundir.checkpoint_base(run, rundir.SHARED)
    if checkpoint.exists(base):
        step_counter["step"] = int(checkpoint.load_meta(base)["step"])
    return train_loop(rundir.SHARED, model, step_loss, loop_cfg, run, stream, progress)


def load_shared(run: Path, recipe: Recipe) -> SharedBlocks:
    frozen = rundir.frozen_from_checkpoint(run, rundir.SHARED, recipe.frozen_arrays, recipe=recipe.name)
    return rundir.load_model(run, rundir.SHARED, SharedBlocks(recipe, frozen), recipe=recipe.name)
