"""The training loop shared by a block, the end-to-end baseline and the paper-shared layout.

A pure LR schedule of the step, AdamW decaying only weight matrices, clipping, checkpoints with the
optimizer and the stream position (so an interrupted run resumes bit-identical), metrics lines.
Losses are summed on the device and read once per logging window: no host sync per step. Under
torchrun the step's loss goes through DDP and rank 0 alone writes (`dbcore.runs.data_parallel`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dbcore.config import Config
from dbcore.data import store
from dbcore.data.stream import BatchStream
from dbcore.method.batch import INDEX, Batch
from dbcore.method.flops import Ledger
from dbcore.progress import bar as progress_bar
from dbcore.recipes.base import decayed_parameters
from dbcore.runs import checkpoint, data_parallel, rundir
from dbcore.runs.data_parallel import ONE, World
from dbcore.runs.step import NumpyBatch, update

LOG_EVERY = 25


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch: NumpyBatch, names: tuple[str, ...], device: torch.device) -> Batch:
    """The streamed arrays `names` and the sample indices as tensors on `device`. To CUDA they go
    through page-locked host memory, so the copy is asynchronous (from pageable memory a
    non-blocking copy still waits for the host)."""
    pin = device.type == "cuda"

    def put(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return (t.pin_memory() if pin else t).to(device, non_blocking=True)

    return {k: put(batch[k]) for k in (*names, INDEX)}


def noise_seed(s: store.Store) -> int:
    return int(s.attrs.get("noise", {}).get("seed", 0))


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup then cosine decay to zero; a pure function of the step (resumable)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def _resume(base: Path, model: nn.Module, opt: torch.optim.Optimizer, stream: BatchStream,
            ledger: Ledger | None) -> int:
    if not checkpoint.exists(base):
        return 0
    tensors, meta = checkpoint.load(base)
    checkpoint.load_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                         f"checkpoint {base} (resuming)")
    _load_optim(opt, {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["param_groups"])
    stream.load_state_dict(meta["stream"])
    if ledger is not None and "compute" in meta:
        restored = Ledger.from_json(meta["compute"])
        ledger.passes, ledger.flops = restored.passes, restored.flops
    return int(meta["step"])


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW decaying only Linear/Conv weight matrices (`decay = "matrices"`), or every parameter;
    the fused CUDA implementation when the model is on a GPU."""
    t = cfg.train
    fused = {"fused": True} if all(p.is_cuda for p in model.parameters()) else {}
    if t.decay == "all":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, **fused)
    decay, rest = decayed_parameters(model)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, **fused)


def prepare_device(model: nn.Module, cfg: Config) -> torch.device:
    """TF32 matmuls on CUDA (unless precision = "fp32"), and `torch.compile` when asked; the
    model's device."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        tf32 = cfg.train.precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if cfg.train.compile:
        model.compile()  # in place: parameter names, so checkpoints, unchanged
    return device


def _batches(stream: BatchStream) -> Iterator[NumpyBatch]:
    """Endless batches, epoch after epoch, from wherever the stream stands."""
    while True:
        yield from stream


# ----------------------------------------------------------------------------- the loops


def train_loop(name: str, model: nn.Module, step_loss: Callable[[NumpyBatch], torch.Tensor], cfg: Config,
               run: Path, stream: BatchStream, progress: bool, ledger: Ledger | None = None,
               world: World = ONE) -> dict:
    """Shared loop of a block and of the end-to-end model: LR, clipping, checkpoints, metrics.
    `ledger`: the compute that `step_loss` books per step, kept in checkpoints and metrics;
    `world`: the processes training this model data-parallel (rank 0 writes)."""
    with rundir.writing(run, name, world.writer):
        return _loop(name, model, step_loss, cfg, run, stream, progress, ledger, world)


def _loop(name: str, model: nn.Module, step_loss: Callable[[NumpyBatch], torch.Tensor], cfg: Config,
          run: Path, stream: BatchStream, progress: bool, ledger: Ledger | None, world: World) -> dict:
    t = cfg.train
    base = rundir.checkpoint_base(run, name)
    prepare_device(model, cfg)
    opt = make_optimizer(model, cfg)
    start = _resume(base, model, opt, stream, ledger)
    data_parallel.agree(world, start, f"the step {name} resumes from (is the run directory shared?)")
    loss_of = data_parallel.distributed_loss(model, step_loss, world)
    meta = {"name": name, "recipe": cfg.recipe, "total_steps": t.steps,
            "config_fingerprint": cfg.fingerprint()}
    if start >= t.steps:
        return {"name": name, "resumed_at": start, "steps": 0}
    bar = progress_bar(t.steps, name, "step", enabled=progress and world.writer, initial=start)
    t0, wait, loss_sum, loss_count = time.perf_counter(), 0.0, torch.zeros(()), 0
    batches = _batches(stream)
    for step in range(start, t.steps):
        w0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - w0
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = update(model, opt, functools.partial(loss_of, batch), t.precision, t.grad_clip)
        loss_sum, loss_count = loss_sum.to(loss.device) + loss.detach().float(), loss_count + 1
        bar.update(1)
        done = step + 1
        if done % LOG_EVERY == 0 or done == t.steps:
            elapsed = time.perf_counter() - t0
            mean_loss = float(data_parallel.mean_over_ranks(loss_sum, world)) / loss_count  # the one sync
            line = {"name": name, "step": done, "loss": mean_loss, "lr": lr, "elapsed_s": round(elapsed, 3),
                    "data_wait_fraction": round(wait / elapsed, 5)}
            if world.writer:
                rundir.log_metrics(run, line if ledger is None else {**line, "compute": ledger.to_json()})
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            loss_sum, loss_count = torch.zeros((), device=loss.device), 0
        if world.writer and (done % t.checkpoint_every == 0 or done == t.steps):
            compute = {} if ledger is None else {"compute": ledger.to_json()}
            _save(base, model, opt, {**meta, "step": done, "done": done == t.steps,
                                     "stream": stream.state_dict(), **compute})
    bar.close()
    stream.close()
    elapsed = time.perf_counter() - t0
    result = {"name": name, "resumed_at": start, "steps": t.steps - start, "seconds": round(elapsed, 3),
              "data_wait_fraction": round(wait / elapsed, 5)}
    return result if ledger is None else {**result, "compute": ledger.to_json()}
