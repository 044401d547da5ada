"""`dbcore train`: train each block alone (or the end-to-end baseline) from a cache store.

One block in memory at a time: built by the run's recipe, with its own AdamW, LR schedule and
checkpoint (`dbcore.loop`). Batches stream from the store through `dbcore.data.BatchStream` (Rust,
prefetched); their noise comes through `Recipe.noise` (for z = y + sigma * eps, `dbcore.noise.block_noise`:
cached, online or on the device).
The run directory's files belong to `dbcore.rundir`. Interrupted runs resume bit-identical: batch
order is a function of (seed, epoch), noise of (seed, sample, block, draw), the LR of the step, and
the stream's position is part of the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dbcore import layout, remote, rundir, store
from dbcore.chain import chain_states_for
from dbcore.config import Config
from dbcore.data import INDEX, BatchStream
from dbcore.flops import Ledger
from dbcore.kernels import resolve_backend
from dbcore.layers import checkpoint_layers
from dbcore.loop import NumpyBatch, noise_seed, resolve_device, to_device, train_loop
from dbcore.paper_shared import train_paper_shared
from dbcore.recipes import for_config
from dbcore.recipes.base import Frozen, Recipe, read_frozen
from dbcore.rundir import RunError
from dbcore.wording import arg

__all__ = ["RunError", "check_store", "train_block", "train_e2e", "train_run"]


def check_store(cfg: Config, s: store.Store) -> None:
    """Refuse a store of another format or recipe, or cached for another config."""
    if s.attrs.get("format") != layout.FORMAT:
        found = s.attrs.get("format")
        raise RunError(f"store {s.path}: not a dbcore cache (attribute 'format' is {found!r})")
    found = s.attrs.get("recipe")
    if found != cfg.recipe:
        raise RunError(f"store {s.path}: cached for recipe {found!r}, the config {cfg.source_path} is "
                       f"recipe {cfg.recipe!r}; cache it again with this config")
    cached = bool(s.attrs.get("noise", {}).get("draws"))
    if s.attrs.get("cache_fingerprint") != cfg.cache_fingerprint(cached):
        stored = s.attrs.get("cache_fields", {})
        diff = sorted(k for k, v in cfg.cache_fields(cached).items() if stored.get(k) != v)
        raise RunError(
            f"store {s.path}: cached with other values of {diff} than {cfg.source_path}; "
            "re-run `dbcore cache` with this config"
        )


def train_block(cfg: Config, store_path: Path, run: Path, block: int, progress: bool = True,
                chain: tuple[torch.Tensor, torch.Tensor] | None = None,
                activation_checkpointing: bool = False) -> dict:
    """Train network block `block` alone. `chain`: (z, sigma) states handed by earlier blocks;
    `activation_checkpointing`: every layer of the block recomputes its activations in backward,
    over `[train] checkpoint_chunks` slices of the batch."""
    t = cfg.train
    recipe = for_config(cfg)
    device = resolve_device(t.device)
    backend = resolve_backend(t.backend, device)
    store_path = recipe.training_store(store_path, run, rundir.block_name(block))
    s = store.open(store_path)
    frozen = read_frozen(s, recipe)
    torch.manual_seed(t.seed * 1009 + block)
    model = recipe.build_block(block, frozen).to(device)
    if activation_checkpointing:
        checkpoint_layers(model, t.checkpoint_chunks)
    frozen = {k: v.to(device) for k, v in frozen.items()}
    req = recipe.noise_request(recipe.target_shape(frozen))
    # with the CUDA kernels the device draws the Gaussians itself: the stream ships only uniforms
    gaussians = 0 if backend == "cupy" else req.gaussians
    stream = BatchStream.for_block(store_path, block, t.batch_size, arrays=recipe.stream_arrays,
                                   gaussians=gaussians, uniforms=req.uniforms, seed=t.seed, drop_last=True)
    law, seed = recipe.sigma_law(block), noise_seed(s)
    ledger, flops = compute_ledger(recipe, t.batch_size, frozen)

    def step_loss(b: NumpyBatch) -> torch.Tensor:
        batch = to_device(b, recipe.stream_arrays, device)
        draw = stream.epoch
        y = recipe.targets(batch, frozen)  # (B, ...)
        noised = recipe.noise(b, y, block, draw, law, seed, backend)
        y_train = recipe.train_targets(y, batch, frozen, block, draw)
        if y_train is not y:  # e.g. target mixing: same sigma * eps around the new target
            noised.z = noised.z + (y_train - y)
        if chain is not None:
            take = int(round(t.sequential_fraction * len(y)))
            idx = batch[INDEX][:take].cpu()
            noised.z, noised.sigma = noised.z.clone(), noised.sigma.clone()
            noised.z[:take] = chain[0][idx].to(device, noised.z.dtype)
            noised.sigma[:take] = chain[1][idx].to(device)
        if ledger is not None:
            ledger.add(recipe.step_passes("block", noised), flops)
        return recipe.block_loss(model, batch, noised, recipe.loss_weights(noised), backend)

    return train_loop(rundir.block_name(block), model, step_loss, cfg, run, stream, progress, ledger)


def e2e_noise_key(cfg: Config) -> int:
    """The generator's block id of a denoising baseline: B + 1, no network block's id (0..B-1)
    and not the sampler's initial noise (B)."""
    return cfg.model.num_blocks + 1


def train_e2e(cfg: Config, store_path: Path, run: Path, progress: bool = True,
              activation_checkpointing: bool = False) -> dict:
    t = cfg.train
    recipe = for_config(cfg)
    device = resolve_device(t.device)
    backend = resolve_backend(t.backend, device)
    store_path = recipe.training_store(store_path, run, rundir.E2E)
    s = store.open(store_path)
    frozen = read_frozen(s, recipe)
    torch.manual_seed(t.seed)
    model = recipe.build_e2e(frozen).to(device)
    if activation_checkpointing:  # the same mechanism as the blocks', so memory compares like with like
        checkpoint_layers(model, t.checkpoint_chunks)
    frozen = {k: v.to(device) for k, v in frozen.items()}
    key, seed = e2e_noise_key(cfg), noise_seed(s)
    noise = None
    if recipe.e2e_noise:
        req = recipe.noise_request(recipe.target_shape(frozen))
        noise = (seed, key, 0 if backend == "cupy" else req.gaussians, req.uniforms)
    stream = BatchStream(store_path, list(recipe.stream_arrays), t.batch_size, seed=t.seed,
                         drop_last=True, noise=noise)
    ledger, flops = compute_ledger(recipe, t.batch_size, frozen)

    def step_loss(b: NumpyBatch) -> torch.Tensor:
        batch = to_device(b, recipe.stream_arrays, device)
        noised = None
        if recipe.e2e_noise:
            y = recipe.targets(batch, frozen)
            noised = recipe.noise(b, y, key, stream.epoch, recipe.e2e_law(), seed, backend)
        if ledger is not None:
            ledger.add(recipe.step_passes("e2e", noised), flops)
        w = None if noised is None else recipe.loss_weights(noised)
        return recipe.e2e_loss(model, batch, noised, w, backend)

    return train_loop(rundir.E2E, model, step_loss, cfg, run, stream, progress, ledger)


def compute_ledger(recipe: Recipe, batch_size: int, frozen: Frozen) -> tuple[Ledger | None, dict[str, float]]:
    """An empty compute ledger and the modules' forward FLOPs per pass, if the recipe keeps one."""
    flops = recipe.pass_flops(batch_size, frozen)
    return (Ledger() if flops else None), flops


# ----------------------------------------------------------------------------- a whole run


@remote.mirrored("run")
def train_run(cfg: Config, store_path: Path, run: Path, block: int | None = None,
              e2e: bool = False, activation_checkpointing: bool = False, progress: bool = True,
              paper_shared: bool = False) -> list[dict]:
    """Train every block in turn (one in memory at a time), one block, the end-to-end baseline, or
    (for comparison only) the paper's shared layout (`dbcore.paper_shared`)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_store(cfg, store.open(store_path))
    kind = "e2e" if e2e else "paper-shared" if paper_shared else "blocks"
    rundir.write_run_json(run, cfg.to_dict(), store_path, kind)
    if paper_shared:
        return [train_paper_shared(cfg, store_path, run, progress)]
    if e2e:
        return [train_e2e(cfg, store_path, run, progress, activation_checkpointing)]
    if cfg.train.mode == "sequential" and not for_config(cfg).chain_training:
        raise RunError(f"recipe {cfg.recipe!r} trains its blocks independently only; "
                       "set [train] mode = \"independent\"")
    num_blocks = cfg.model.num_blocks
    blocks = range(num_blocks) if block is None else [block]
    if block is not None and not 0 <= block < num_blocks:
        raise RunError(f"{arg('block', block)} is outside 0..{num_blocks - 1}")
    results = []
    for b in blocks:
        chain = None
        if cfg.train.mode == "sequential" and b > 0:
            chain = chain_states_for(cfg, store_path, run, b)
        results.append(train_block(cfg, store_path, run, b, progress, chain, activation_checkpointing))
    return results
