"""`dbcore train`: train each block alone (or the end-to-end baseline) from a cache store.

One block in memory at a time: built by the run's recipe, with its own AdamW, LR schedule and
checkpoint (`dbcore.runs.loop`), one step of it `dbcore.runs.step`. The store is opened once per
command and its handle passed on: to the frozen arrays, to the frozen-module stage and to the
Rust stream (`dbcore.data.stream.BatchStream`, prefetched), whose batches' noise comes through
`Recipe.noise` (cached, online or on the device).
The run directory's files belong to `dbcore.runs.rundir`. Interrupted runs resume bit-identical: batch
order is a function of (seed, epoch), noise of (seed, sample, block, draw), the LR of the step, and
the stream's position is part of the checkpoint. Under torchrun every block (or the baseline) is
trained data-parallel by all the processes (`dbcore.runs.data_parallel`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dbcore.config import Config
from dbcore.data import store
from dbcore.data.frozen import read_frozen
from dbcore.data.location import Location
from dbcore.data.stream import BatchStream
from dbcore.errors import RunError
from dbcore.kernels import resolve_backend
from dbcore.method import layout
from dbcore.method.batch import Frozen
from dbcore.method.flops import Ledger
from dbcore.models.layers import checkpoint_layers
from dbcore.recipes import for_config
from dbcore.recipes.base import Recipe
from dbcore.runs import checkpoint, data_parallel, mirror, rundir
from dbcore.runs.chain import chain_states_for
from dbcore.runs.data_parallel import ONE, World
from dbcore.runs.frozen_module import stream_windows, training_store
from dbcore.runs.loop import noise_seed, resolve_device, to_device, train_loop
from dbcore.runs.paper_shared import train_paper_shared
from dbcore.runs.step import (
    Chain,
    NumpyBatch,
    augmented,
    block_noised,
    block_step_loss,
    e2e_noise_key,
    e2e_noised,
    e2e_step_loss,
)

__all__ = ["RunError", "check_store", "train_block", "train_e2e", "train_run"]


def check_store(cfg: Config, s: store.Store) -> None:
    """Refuse a store of another format or recipe, or cached for another config."""
    if s.attrs.get("format") != layout.FORMAT:
        found = s.attrs.get("format")
        raise RunError(f"store {s.path}: not a dbcore cache (attribute 'format' is {found!r})")
    if layout.OLD_VOCAB in s.arrays():
        raise RunError(f"store {s.path}: a text store of an older layout (windows of int32, a character "
                       "vocabulary); cache it again with `dbcore cache`")
    found = s.attrs.get("recipe")
    if found != cfg.recipe:
        raise RunError(f"store {s.path}: cached for recipe {found!r}, the config {cfg.source_path} is "
                       f"recipe {cfg.recipe!r}; cache it again with this config")
    cached = bool(s.attrs.get("noise", {}).get("draws"))
    if cached and cfg.train.augments and for_config(cfg).augment_changes_targets:
        raise RunError(f"store {s.path}: holds cached noised targets of the images as stored, and "
                       f"{cfg.source_path} augments them ([train] augment_crop, augment_flip); cache it with "
                       "noise online")
    if s.attrs.get("cache_fingerprint") != cfg.cache_fingerprint(cached):
        stored = s.attrs.get("cache_fields", {})
        diff = sorted(k for k, v in cfg.cache_fields(cached).items() if stored.get(k) != v)
        raise RunError(
            f"store {s.path}: cached with other values of {diff} than {cfg.source_path}; "
            "re-run `dbcore cache` with this config"
        )


def opened(store_or_path: store.Store | Location) -> store.Store:
    """A store handle: the one given, or the store at a location, opened."""
    return store_or_path if isinstance(store_or_path, store.Store) else store.open(store_or_path)


def train_block(cfg: Config, cache: store.Store | Location, run: Path, block: int, progress: bool = True,
                chain: Chain | None = None, activation_checkpointing: bool = False,
                world: World = ONE) -> dict:
    """Train network block `block` alone from the cache store (a handle, or its location).
    `chain`: (z, sigma) states handed by earlier blocks; `activation_checkpointing`: every layer
    of the block recomputes its activations in backward, over `[train] checkpoint_chunks` slices;
    `world`: the processes that train it data-parallel."""
    t = cfg.train
    recipe = for_config(cfg)
    device = resolve_device(data_parallel.device_of(t.device, world))
    backend = resolve_backend(t.backend, device)
    with data_parallel.writer_first(world):
        s = training_store(recipe, opened(cache), run, rundir.block_name(block))
    frozen = read_frozen(s, recipe.frozen_arrays)
    torch.manual_seed(t.seed * 1009 + block)
    model = recipe.build_block(block, frozen).to(device)
    if activation_checkpointing:
        checkpoint_layers(model, t.checkpoint_chunks)
    frozen = {k: v.to(device) for k, v in frozen.items()}
    req = recipe.noise_request(recipe.target_shape(frozen))
    # with the CUDA kernels the device draws the Gaussians itself: the stream ships only uniforms
    gaussians = 0 if backend == "cupy" else req.gaussians
    stream = BatchStream.for_block(s, block, world.local_batch(t.batch_size), arrays=recipe.stream_arrays,
                                   gaussians=gaussians, uniforms=req.uniforms, seed=t.seed, drop_last=True,
                                   window_bytes=cfg.window_bytes(), rank=world.rank, world_size=world.size,
                                   windows=stream_windows(recipe, s))
    seed = noise_seed(s)
    ledger, flops = compute_ledger(recipe, t.batch_size, frozen)

    def step_loss(raw: NumpyBatch) -> torch.Tensor:
        batch = augmented(recipe, to_device(raw, recipe.stream_arrays, device), t, stream.epoch)
        noised = block_noised(recipe, raw, batch, frozen, block, stream.epoch, seed, backend, chain,
                              t.sequential_fraction)
        if ledger is not None:
            ledger.add(recipe.step_passes("block", noised), flops)
        return block_step_loss(recipe, model, batch, noised, backend)

    return train_loop(rundir.block_name(block), model, step_loss, cfg, run, stream, progress, ledger, world)


def train_e2e(cfg: Config, cache: store.Store | Location, run: Path, progress: bool = True,
              activation_checkpointing: bool = False, world: World = ONE) -> dict:
    """Train the end-to-end baseline from the cache store (a handle, or its location)."""
    t = cfg.train
    recipe = for_config(cfg)
    device = resolve_device(data_parallel.device_of(t.device, world))
    backend = resolve_backend(t.backend, device)
    with data_parallel.writer_first(world):
        s = training_store(recipe, opened(cache), run, rundir.E2E)
    frozen = read_frozen(s, recipe.frozen_arrays)
    torch.manual_seed(t.seed)
    model = recipe.build_e2e(frozen).to(device)
    if activation_checkpointing:  # the same mechanism as the blocks', so memory compares like with like
        checkpoint_layers(model, t.checkpoint_chunks)
    frozen = {k: v.to(device) for k, v in frozen.items()}
    key, seed = e2e_noise_key(cfg.model.num_blocks), noise_seed(s)
    noise = None
    if recipe.e2e_noise:
        req = recipe.noise_request(recipe.target_shape(frozen))
        noise = (seed, key, 0 if backend == "cupy" else req.gaussians, req.uniforms)
    stream = BatchStream(s, list(recipe.stream_arrays), world.local_batch(t.batch_size), seed=t.seed,
                         drop_last=True, noise=noise, window_bytes=cfg.window_bytes(), rank=world.rank,
                         world_size=world.size, windows=stream_windows(recipe, s))
    ledger, flops = compute_ledger(recipe, t.batch_size, frozen)

    def step_loss(raw: NumpyBatch) -> torch.Tensor:
        batch = augmented(recipe, to_device(raw, recipe.stream_arrays, device), t, stream.epoch)
        noised = e2e_noised(recipe, raw, batch, frozen, key, stream.epoch, seed, backend)
        if ledger is not None:
            ledger.add(recipe.step_passes("e2e", noised), flops)
        return e2e_step_loss(recipe, model, batch, noised, backend)

    return train_loop(rundir.E2E, model, step_loss, cfg, run, stream, progress, ledger, world)


def compute_ledger(recipe: Recipe, batch_size: int, frozen: Frozen) -> tuple[Ledger | None, dict[str, float]]:
    """An empty compute ledger and the modules' forward FLOPs per pass, if the recipe keeps one."""
    flops = recipe.pass_flops(batch_size, frozen)
    return (Ledger() if flops else None), flops


# ----------------------------------------------------------------------------- a whole run


def _objects_needed(arguments: dict[str, Any]) -> Callable[[str], bool] | None:
    """Of an s3:// run, what training one model alone needs: every checkpoint's JSON (which says
    what is finished), and only its own checkpoint's tensors; None (everything) otherwise."""
    cfg, block = arguments["cfg"], arguments["block"]
    if arguments["e2e"]:
        name = "e2e"
    elif block is not None and cfg.train.mode != "sequential":
        name = rundir.block_name(block)
    else:
        return None
    return lambda rel: not rel.endswith(checkpoint.TENSORS) or rel == name + checkpoint.TENSORS


@mirror.mirrored("run", needs=_objects_needed)
def train_run(cfg: Config, store_path: store.Store | Location, run: Path, block: int | None = None,
              e2e: bool = False, activation_checkpointing: bool = False, progress: bool = True,
              paper_shared: bool = False) -> list[dict]:
    """Train every block in turn (one in memory at a time), one block, the end-to-end baseline, or
    (for comparison only) the paper's shared layout (`dbcore.runs.paper_shared`). `store_path`:
    the cache store, a location or an open handle. Under torchrun (WORLD_SIZE > 1) every process
    calls this and each block, or the baseline, trains data-parallel over them."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.cache_limit_gb >= 0:  # before the store is opened
        store.configure_cache(limit=int(cfg.train.cache_limit_gb * 2**30))
    world = data_parallel.world(cfg.train.device)
    try:
        results = _train_run(cfg, store_path, run, block, e2e, activation_checkpointing, progress,
                             paper_shared, world)
    except BaseException:
        data_parallel.finish(world, failed=True)
        raise
    data_parallel.finish(world)
    return results


def _train_run(cfg: Config, store_path: store.Store | Location, run: Path, block: int | None, e2e: bool,
               activation_checkpointing: bool, progress: bool, paper_shared: bool, world: World
               ) -> list[dict]:
    cache = opened(store_path)  # the one open of the store in this command
    check_store(cfg, cache)
    kind = "e2e" if e2e else "paper-shared" if paper_shared else "blocks"
    world.local_batch(cfg.train.batch_size)  # on every rank, before any file is written
    if world.size > 1 and (paper_shared or cfg.train.mode == "sequential"):
        raise RunError("under torchrun a block or the baseline trains data-parallel; the paper-shared "
                       "layout and [train] mode = \"sequential\" train in one process")
    num_blocks = cfg.model.num_blocks
    if block is not None:
        data_parallel.check_block(world, block, num_blocks)
    with data_parallel.writer_first(world):
        if world.writer:
            rundir.write_run_json(run, cfg.to_dict(), cache.path, kind)
    if paper_shared:
        return [train_paper_shared(cfg, cache, run, progress)]
    if e2e:
        return [train_e2e(cfg, cache, run, progress, activation_checkpointing, world)]
    if cfg.train.mode == "sequential" and not for_config(cfg).chain_training:
        raise RunError(f"recipe {cfg.recipe!r} trains its blocks independently only; "
                       "set [train] mode = \"independent\"")
    blocks = range(num_blocks) if block is None else [block]
    results = []
    for b in blocks:
        chain = None
        if cfg.train.mode == "sequential" and b > 0:
            chain = chain_states_for(cfg, cache, run, b)
        results.append(train_block(cfg, cache, run, b, progress, chain, activation_checkpointing, world))
    return results
