from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from dbcore import checkpoint, layout, rundir, store
from dbcore.chain import chain_states_for
from dbcore.config import Config
from dbcore.data import INDEX, BatchStream
from dbcore.edm import SIGMA_MAX, SIGMA_MIN
from dbcore.kernels import resolve_backend
from dbcore.loss import sample_weights
from dbcore.noise import block_noise
from dbcore.recipes import for_config
from dbcore.recipes.base import Batch, decayed_parameters, read_frozen
from dbcore.rundir import RunError

LOG_EVERY = 25
E2E_LAW = (SIGMA_MIN, SIGMA_MAX, "lognormal")  # a denoising baseline trains over the whole range
NumpyBatch = dict[str, np.ndarray]

__all__ = ["RunError", "train_run", "train_block", "train_e2e", "lr_at", "make_optimizer"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch: NumpyBatch, names: tuple[str, ...], device: torch.device) -> Batch:
    """The streamed arrays `names` and the sample indices as tensors on `device`."""
    return {k: torch.from_numpy(np.ascontiguousarray(batch[k])).to(device, non_blocking=True)
            for k in (*names, INDEX)}


def noise_seed(s: store.Store) -> int:
    return int(s.attrs.get("noise", {}).get("seed", 0))


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup then cosine decay to zero; a pure function of the step (resumable)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


# ----------------------------------------------------------------------------- optimizer state


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def _load_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        _, i, k = name.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def _save(base: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict) -> str:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim, groups = _optim_tensors(opt)
    return checkpoint.save(base, {**tensors, **optim}, {**meta, "param_groups": groups})


def _resume(base: Path, model: nn.Module, opt: torch.optim.Optimizer, stream: BatchStream) -> int:
    if not checkpoint.exists(base):
        return 0
    tensors, meta = checkpoint.load(base)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optim(opt, {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["param_groups"])
    stream.load_state_dict(meta["stream"])
    return int(meta["step"])


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW decaying only Linear/Conv weight matrices (`decay = "matrices"`), or every parameter."""
    t = cfg.train
    if t.decay == "all":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    decay, rest = decayed_parameters(model)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr)


def _batches(stream: BatchStream) -> Iterator[NumpyBatch]:
    """Endless batches, epoch after epoch, from wherever the stream stands."""
    while True:
        yield from stream


# ----------------------------------------------------------------------------- the loops


def _train_loop(name: str, model: nn.Module, step_loss: Callable[[NumpyBatch], torch.Tensor], cfg: Config,
                run: Path, stream: BatchStream, progress: bool) -> dict:
    """Shared loop of a block and of the end-to-end model: LR, clipping, checkpoints, metrics."""
    t = cfg.train
    base = rundir.checkpoint_base(run, name)
    opt = make_optimizer(model, cfg)
    start = _resume(base, model, opt, stream)
    meta = {"name": name, "recipe": cfg.recipe, "total_steps": t.steps,
            "config_fingerprint": cfg.fingerprint()}
    if start >= t.steps:
        return {"name": name, "resumed_at": start, "steps": 0}
    bar = tqdm(total=t.steps, initial=start, desc=name, disable=not progress, unit="step")
    t0, wait, loss_sum, loss_count = time.perf_counter(), 0.0, torch.zeros(()), 0
    batches = _batches(stream)
    for step in range(start, t.steps):
        w0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - w0
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = step_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        loss_sum, loss_count = loss_sum.to(loss.device) + loss.detach().float(), loss_count + 1
        bar.update(1)
        done = step + 1
        if done % LOG_EVERY == 0 or done == t.steps:
            elapsed = time.perf_counter() - t0
            mean_loss = float(loss_sum) / loss_count  # the only host sync of the loop
            rundir.log_metrics(run, {"name": name, "step": done, "loss": mean_loss, "lr": lr,
                                     "elapsed_s": round(elapsed, 3),
                                     "data_wait_fraction": round(wait / elapsed, 5)})
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            loss_sum, loss_count = torch.zeros((), device=loss.device), 0
        if done % t.checkpoint_every == 0 or done == t.steps:
            _save(base, model, opt, {**meta, "step": done, "done": done == t.steps,
                                     "stream": stream.state_dict()})
    bar.close()
    stream.close()
    elapsed = time.perf_counter() - t0
    return {"name": name, "resumed_at": start, "steps": t.steps - start, "seconds": round(elapsed, 3),
            "data_wait_fraction": round(wait / elapsed, 5)}


def train_block(cfg: Config, store_path: Path, run: Path, block: int, progress: bool = True,
                chain: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Train network block `block` alone. `chain`: (z, sigma) states handed by earlier blocks."""
    t = cfg.train
    recipe = for_config(cfg)
    device = resolve_device(t.device)
    backend = resolve_backend(t.backend, device)
    s = store.open(store_path)
    frozen = read_frozen(s, recipe)
    torch.manual_seed(t.seed * 1009 + block)
    model = recipe.build_block(block, frozen).to(device)
    frozen = {k: v.to(device) for k, v in frozen.items()}
    req = recipe.noise_request(recipe.target_shape(frozen))
    # with the CUDA kernels the device draws the Gaussians itself: the stream ships only uniforms
    gaussians = 0 if backend == "cupy" else req.gaussians
    stream = BatchStream.for_block(store_path, block, t.batch_size, arrays=recipe.stream_arrays,
                                   gaussians=gaussians, uniforms=req.uniforms, seed=t.seed, drop_last=True)
    law, seed = recipe.sigma_law(block), noise_seed(s)

    def step_loss(b: NumpyBatch) -> torch.Tensor:
        batch = to_device(b, recipe.stream_arrays, device)
        draw = stream.epoch
        y = recipe.targets(batch, frozen)  # (B, ...)
        noised = block_noise(b, y, block, draw, law, seed, backend)
        y_train = recipe.train_targets(y, batch, frozen, block, draw)
        if y_train is not y:  # e.g. target mixing: same sigma * eps around the new target
            noised.z = noised.z + (y_train - y)
        if chain is not None:
            take = int(round(t.sequential_fraction * len(y)))
            idx = batch[INDEX][:take].cpu()
            noised.z, noised.sigma = noised.z.clone(), noised.sigma.clone()
            noised.z[:take] = chain[0][idx].to(device, noised.z.dtype)
            noised.sigma[:take] = chain[1][idx].to(device)
        w = sample_weights(noised.sigma, t.weight, t.weight_clamp)
        return recipe.block_loss(model, batch, noised, w, backend)

    return _train_loop(rundir.block_name(block), model, step_loss, cfg, run, stream, progress)


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
    s = store.open(store_path)
    frozen = read_frozen(s, recipe)
    torch.manual_seed(t.seed)
    model = recipe.build_e2e(frozen, activation_checkpointing).to(device)
    frozen = {k: v.to(device) for k, v in frozen.items()}
    key, seed = e2e_noise_key(cfg), noise_seed(s)
    noise = None
    if recipe.e2e_noise:
        req = recipe.noise_request(recipe.target_shape(frozen))
        noise = (seed, key, 0 if backend == "cupy" else req.gaussians, req.uniforms)
    stream = BatchStream(store_path, list(recipe.stream_arrays), t.batch_size, seed=t.seed,
                         drop_last=True, noise=noise)

    def step_loss(b: NumpyBatch) -> torch.Tensor:
        batch = to_device(b, recipe.stream_arrays, device)
        if not recipe.e2e_noise:
            return recipe.e2e_loss(model, batch, None, None, backend)
        draw = stream.epoch
        y = recipe.targets(batch, frozen)
        noised = block_noise(b, y, key, draw, E2E_LAW, seed, backend)
        w = sample_weights(noised.sigma, t.weight, t.weight_clamp)
        return recipe.e2e_loss(model, batch, noised, w, backend)

    return _train_loop(rundir.E2E, model, step_loss, cfg, run, stream, progress)


# ----------------------------------------------------------------------------- a whole run


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
        from dbcore.paper_shared import train_paper_shared

        return [train_paper_shared(cfg, store_path, run, progress)]
    if e2e:
        return [train_e2e(cfg, store_path, run, progress, activation_checkpointing)]
    num_blocks = cfg.model.num_blocks
    blocks = range(num_blocks) if block is None else [block]
    if block is not None and not 0 <= block < num_blocks:
        raise RunError(f"--block {block} is outside 0..{num_blocks - 1}")
    results = []
    for b in blocks:
        chain = None
        if cfg.train.mode == "sequential" and b > 0:
            chain = chain_states_for(cfg, store_path, run, b)
        results.append(train_block(cfg, store_path, run, b, progress, chain))
    return results
