"""`dbcore bench memory`: peak training memory of end-to-end, checkpointed and per-block training.

Each configuration runs in a fresh subprocess (CPU) so no allocator cache leaks between them:
the worker builds its batch, records its resident memory, resets the kernel's high-water mark
(`/proc/self/clear_refs`), runs a few full training steps (optimizer state included) and reports
the high-water mark above that baseline. On CUDA it uses `torch.cuda.max_memory_allocated`.

Allocator (CPU): with glibc's default, freed tensors may stay in the heap and the high-water
mark then counts free space, which varies by tens of MB between identical blocks (allocation
order). `allocator="tight"` (the default) fixes glibc's mmap threshold at 64 KiB, so every tensor
of 64 KiB or more gets its own pages and gives them back when freed: the high-water mark follows
the bytes of live tensors, as `max_memory_allocated` does on CUDA. `allocator="default"` measures
glibc as a process gets it; both are reported by `benches/bench_blocks.py`.
Beside each measurement sits the analytic model of METHOD.md section 5 (App. G of the paper):
end-to-end `(4P + A) L`, activation checkpointing `4PL + A`, one block `(4P + A) L / B`, with P
and A measured per layer (parameter bytes; bytes saved for backward).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from dbcore import config as config_mod
from dbcore.method.batch import INDEX, Batch, Frozen, Noised
from dbcore.models.layers import checkpoint_layers
from dbcore.recipes import for_config
from dbcore.recipes.base import Recipe
from dbcore.runs.process_memory import status_bytes
from dbcore.runs.step import (
    autocast_for,
    block_noised,
    block_step_loss,
    drawn_here,
    e2e_noise_key,
    e2e_noised,
    e2e_step_loss,
    precision_of,
    update,
)

MEASURED_STEPS = 3
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
TIGHT_MMAP_THRESHOLD = 64 * 1024
ALLOCATORS = ("tight", "default")
TIMED_STEPS = 5


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _noised(recipe: Recipe, batch: Batch, frozen: Frozen, block: int | None) -> Noised | None:
    """Block `block`'s noise (the baseline's for block None) from the generator, seed 0, draw 0,
    as training draws it (`dbcore.runs.step`)."""
    key = e2e_noise_key(recipe.model_cfg.num_blocks) if block is None else block
    uniforms = recipe.noise_request(recipe.target_shape(frozen)).uniforms
    drawn = drawn_here(batch[INDEX].cpu().numpy(), uniforms, 0, key, 0)
    if block is None:
        return e2e_noised(recipe, drawn, batch, frozen, key, 0, 0, "torch")
    return block_noised(recipe, drawn, batch, frozen, block, 0, 0, "torch")


def training_loss(recipe: Recipe, model: nn.Module, batch: Batch, frozen: Frozen, block: int | None,
                  noised: Noised | None) -> torch.Tensor:
    """The recipe's loss of a block (or of the baseline, block None), as a training step takes it."""
    if block is None:
        return e2e_step_loss(recipe, model, batch, noised, "torch")
    return block_step_loss(recipe, model, batch, noised, "torch")


def _warm_up(cfg, dev: torch.device) -> None:
    """One tiny training step first, so that one-off library state (thread pools, kernel caches,
    autograd engine) sits in the baseline rather than in the training peak; then give freed heap
    back to the OS so the baseline holds no reusable free memory."""
    try:
        model_cfg = dataclasses.replace(cfg.model, depth=1, num_blocks=1, layer_split=None)
    except ValueError:  # a depth fixed by the model's parts (looped): the model as configured
        model_cfg = cfg.model
    tiny = dataclasses.replace(cfg, model=model_cfg)
    recipe = for_config(tiny)
    frozen = {k: v.to(dev) for k, v in recipe.example_frozen().items()}
    model = recipe.build_e2e(frozen).to(dev)
    batch = recipe.example_batch(2, frozen, dev)
    noised = _noised(recipe, batch, frozen, None) if recipe.e2e_noise else None
    opt = torch.optim.AdamW(model.parameters())
    training_loss(recipe, model, batch, frozen, None, noised).backward()
    opt.step()
    del model, opt, batch
    gc.collect()
    if dev.type == "cpu":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _SavedBytes:
    """Bytes of distinct tensors autograd saves for backward (the activations A)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def total(self) -> int:
        return sum(self.seen.values())

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context in which every tensor autograd saves is counted."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _build(kind: str, recipe: Recipe, frozen: Frozen, chunks: int) -> nn.Module:
    """The model of a configuration kind; "_checkpointed" ones by `checkpoint_layers`, as the
    trainer does for blocks and baseline alike."""
    block = _block_of(kind)
    model = recipe.build_e2e(frozen) if block is None else recipe.build_block(block, frozen)
    return checkpoint_layers(model, chunks) if kind.endswith("_checkpointed") else model


def _block_of(kind: str) -> int | None:
    """The block index of a configuration kind ("block2", "block2_checkpointed"), None for e2e."""
    if not kind.startswith("block"):
        return None
    return int(kind.removeprefix("block").removesuffix("_checkpointed"))


def _check_allocator(allocator: str) -> None:
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}")


def _set_allocator(allocator: str) -> None:
    _check_allocator(allocator)
    if allocator == "tight" and not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, TIGHT_MMAP_THRESHOLD):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: is this glibc?")


def worker(config_path: str, kind: str, batch_size: int, device: str, allocator: str = "tight",
           chunks: int = 1, timed_steps: int = TIMED_STEPS) -> dict:
    """Run in a fresh process: peak bytes above baseline, median step time of `timed_steps` more
    steps (None for 0), params, saved activations; `chunks`: the checkpointed kinds'
    `checkpoint_chunks`."""
    _set_allocator(allocator)
    cfg = config_mod.load(config_path)
    recipe = for_config(cfg)
    torch.manual_seed(0)
    dev = torch.device(device)
    _warm_up(cfg, dev)
    frozen = recipe.example_frozen()
    model = _build(kind, recipe, frozen, chunks)
    frozen = {k: v.to(dev) for k, v in frozen.items()}
    batch = recipe.example_batch(batch_size, frozen, dev)
    block = _block_of(kind)
    noised = _noised(recipe, batch, frozen, block) if block is not None or recipe.e2e_noise else None
    # the model's weights count as training memory: measure from before they are placed
    model_cpu_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = status_bytes("VmRSS") - model_cpu_bytes
        _reset_peak()
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> torch.Tensor:  # as the trainer runs it: bf16 on CUDA by default
        return update(model, opt, lambda: training_loss(recipe, model, batch, frozen, block, noised),
                      cfg.train.precision, cfg.train.grad_clip)

    for _ in range(MEASURED_STEPS):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = status_bytes("VmHWM") - base
    times = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    saved = _SavedBytes()
    with saved.hooks(), autocast_for(cfg.train.precision, dev):
        out = training_loss(recipe, model, batch, frozen, block, noised)
    del out
    params = sum(p.numel() for p in model.parameters())
    return {"kind": kind, "precision": precision_of(cfg.train.precision, dev), "peak_bytes": int(peak),
            "step_seconds": sorted(times)[len(times) // 2] if times else None,
            "params": params, "param_bytes": params * 4, "saved_activation_bytes": saved.total()}


def _spawn(config_path: str, kind: str, batch_size: int, device: str, allocator: str, chunks: int,
           timed_steps: int = TIMED_STEPS) -> dict:
    cmd = [sys.executable, "-m", "dbcore.runs.memory", str(config_path), kind, str(batch_size), device,
           allocator, str(chunks), str(timed_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker {kind} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_all(
    config_path: str | Path, batch_size: int | None = None, device: str = "cpu", allocator: str = "tight",
    checkpoint_chunks: int | None = None, timed_steps: int = TIMED_STEPS,
) -> dict:
    """Every configuration's peak (end-to-end, each block, each with activation checkpointing over
    `checkpoint_chunks` slices, default the config's), beside the analytic model; `timed_steps`
    more steps time each one (0: memory only, for models too slow to time here)."""
    cfg = config_mod.load(config_path)
    _check_allocator(allocator)  # here, before any worker starts
    for name, value, least in (("batch_size", batch_size, 1), ("checkpoint_chunks", checkpoint_chunks, 1),
                               ("timed_steps", timed_steps, 0)):
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    m = cfg.model
    bs = cfg.train.batch_size if batch_size is None else batch_size
    chunks = cfg.train.checkpoint_chunks if checkpoint_chunks is None else checkpoint_chunks
    kinds = ["e2e", "e2e_checkpointed", *[f"block{b}" for b in range(m.num_blocks)],
             *[f"block{b}_checkpointed" for b in range(m.num_blocks)]]
    runs = {k: _spawn(str(config_path), k, bs, device, allocator, chunks, timed_steps) for k in kinds}
    e2e, blocks = runs["e2e"], [runs[f"block{b}"] for b in range(m.num_blocks)]
    checkpointed = [runs[f"block{b}_checkpointed"] for b in range(m.num_blocks)]
    # analytic model, METHOD.md section 5: 4P (weights, gradients, two Adam moments) + A (bytes
    # saved for backward), each configuration from its own parameter count and saved activations
    L, B = m.depth, m.num_blocks

    def model_bytes(r: dict, activations: float) -> float:
        return 4 * r["param_bytes"] + activations

    return {
        "config": str(config_path),
        "device": device,
        "allocator": allocator if device == "cpu" else "cuda caching allocator",
        "batch_size": bs,
        "checkpoint_chunks": chunks,
        "precision": e2e["precision"],
        "num_blocks": B,
        "depth": L,
        "e2e_peak_bytes": e2e["peak_bytes"],
        "checkpointed_peak_bytes": runs["e2e_checkpointed"]["peak_bytes"],
        "block_peak_bytes": [r["peak_bytes"] for r in blocks],
        "block_checkpointed_peak_bytes": [r["peak_bytes"] for r in checkpointed],
        "e2e_params": e2e["params"],
        "block_params": [r["params"] for r in blocks],
        "max_block_over_e2e_per_block": max(r["peak_bytes"] for r in blocks) / (e2e["peak_bytes"] / B),
        "max_checkpointed_block_over_checkpointed_e2e_per_block": (
            max(r["peak_bytes"] for r in checkpointed) / (runs["e2e_checkpointed"]["peak_bytes"] / B)),
        "analytic_bytes": {
            "e2e": model_bytes(e2e, e2e["saved_activation_bytes"]),  # (4P + A) L
            "checkpointed": model_bytes(e2e, e2e["saved_activation_bytes"] / L),  # 4PL + A
            "blocks": [model_bytes(r, r["saved_activation_bytes"]) for r in blocks],  # (4P + A) L / B
        },
        "measured_parts": runs,
    }


if __name__ == "__main__":
    cfg_path, kind, bs, dev, alloc, chunks, timed = sys.argv[1:8]
    print(json.dumps(worker(cfg_path, kind, int(bs), dev, alloc, int(chunks), int(timed))))
