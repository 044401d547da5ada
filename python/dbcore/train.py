"""`dbcore train`: train each block alone (or the end-to-end baseline) from a cache store.

One block in memory at a time: its own model, AdamW, warmup + cosine LR and checkpoint. Batches
stream from the store through `dbcore.data.BatchStream` (Rust, prefetched), so the trainer never
holds the dataset. A run directory holds `run.json`, `block{b}.safetensors/.json` (or `e2e.*`),
`metrics.jsonl` and, in sequential mode, the chain states of earlier blocks (`chain/`).
Interrupted runs resume from the last checkpoint and end bit-identical to an uninterrupted one:
batch order is a function of (seed, epoch), noise of (seed, sample, block, draw), the LR of the
step, and the stream's position is part of the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from dbcore import checkpoint, layout, store
from dbcore.config import Config
from dbcore.data import BatchStream, noised_targets
from dbcore.kernels import block_loss_ce, resolve_backend
from dbcore.loss import sample_weights
from dbcore.noise import mix_targets
from dbcore.recipes.vit import ViTBlock, ViTClassifier

LOG_EVERY = 25
Batch = dict[str, np.ndarray]


class RunError(RuntimeError):
    """A run directory, store or config that do not fit together."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def images_to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def read_target_embedding(s: store.Store) -> torch.Tensor:
    return torch.from_numpy(s.read(layout.TARGET_EMBEDDING)).float()  # (V, d)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup then cosine decay to zero; a pure function of the step (resumable)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_store(cfg: Config, s: store.Store) -> None:
    if s.attrs.get("format") != layout.FORMAT:
        found = s.attrs.get("format")
        raise RunError(f"store {s.path}: not a dbcore cache (attribute 'format' is {found!r})")
    if s.attrs.get("config_fingerprint") != cfg.fingerprint():
        raise RunError(
            f"store {s.path}: cached with a different [model] config than {cfg.source_path}; "
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


def _log(run: Path, record: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def _batches(stream: BatchStream) -> Iterator[Batch]:
    """Endless batches, epoch after epoch, from wherever the stream stands."""
    while True:
        yield from stream


# ----------------------------------------------------------------------------- the loops


def _train_loop(name: str, model: nn.Module, step_loss: Callable[[Batch], torch.Tensor], cfg: Config,
                run: Path, stream: BatchStream, progress: bool) -> dict:
    """Shared loop of a block and of the end-to-end model: LR, clipping, checkpoints, metrics."""
    t = cfg.train
    base = run / name
    opt = make_optimizer(model, cfg)
    start = _resume(base, model, opt, stream)
    meta = {"name": name, "total_steps": t.steps, "config_fingerprint": cfg.fingerprint()}
    if start >= t.steps:
        return {"name": name, "resumed_at": start, "steps": 0}
    bar = tqdm(total=t.steps, initial=start, desc=name, disable=not progress, unit="step")
    t0, wait, loss_sum, loss_count = time.perf_counter(), 0.0, 0.0, 0
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
        loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
        bar.update(1)
        done = step + 1
        if done % LOG_EVERY == 0 or done == t.steps:
            elapsed = time.perf_counter() - t0
            _log(run, {"name": name, "step": done, "loss": loss_sum / loss_count, "lr": lr,
                       "elapsed_s": round(elapsed, 3), "data_wait_fraction": round(wait / elapsed, 5)})
            bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}")
            loss_sum, loss_count = 0.0, 0
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
    m, t = cfg.model, cfg.train
    device = resolve_device(t.device)
    backend = resolve_backend(t.backend, device)
    emb = read_target_embedding(store.open(store_path))
    torch.manual_seed(t.seed * 1009 + block)
    model = ViTBlock(m, block, emb).to(device)
    stream = BatchStream.for_block(store_path, block, t.batch_size, seed=t.seed, drop_last=True)

    def step_loss(batch: Batch) -> torch.Tensor:
        labels = torch.from_numpy(batch[layout.LABELS])
        y = emb[labels]  # (B, d)
        z, sigma = noised_targets(batch, y, block, m)  # (B, d), (B,)
        if t.mix_fraction > 0:
            sample = torch.from_numpy(batch["index"])
            z = z + (mix_targets(emb, labels, sample, t.seed, block, stream.epoch, t.mix_fraction) - y)
        if chain is not None:
            take = int(round(t.sequential_fraction * len(labels)))
            idx = torch.from_numpy(batch["index"][:take])
            z, sigma = z.clone(), sigma.clone()
            z[:take], sigma[:take] = chain[0][idx], chain[1][idx]
        x = images_to_tensor(batch[layout.IMAGES], device)
        _, logits = model(x, z.to(device), sigma.to(device))
        w = sample_weights(sigma.to(device), t.weight, t.weight_clamp)
        return block_loss_ce(logits, labels.to(device), w, backend=backend)

    return _train_loop(f"block{block}", model, step_loss, cfg, run, stream, progress)


def train_e2e(cfg: Config, store_path: Path, run: Path, progress: bool = True,
              activation_checkpointing: bool = False) -> dict:
    t = cfg.train
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    model = ViTClassifier(cfg.model, activation_checkpointing=activation_checkpointing).to(device)
    stream = BatchStream(store_path, [layout.IMAGES, layout.LABELS], t.batch_size, seed=t.seed,
                         drop_last=True)

    def step_loss(batch: Batch) -> torch.Tensor:
        x = images_to_tensor(batch[layout.IMAGES], device)
        labels = torch.from_numpy(batch[layout.LABELS]).to(device)
        return nn.functional.cross_entropy(model(x), labels)

    return _train_loop("e2e", model, step_loss, cfg, run, stream, progress)


# ----------------------------------------------------------------------------- a whole run


def _write_run_json(run: Path, cfg: Config, store_path: Path, kind: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    info = {"kind": kind, "store": str(Path(store_path).resolve()), "config": cfg.to_dict()}
    path = run / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("kind") != kind or old.get("config") != info["config"]:
            raise RunError(f"run {run}: holds a {old.get('kind')} run of another config; use a new --out")
        return
    tmp = path.with_name("run.json.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(path)


def train_run(cfg: Config, store_path: Path, run: Path, block: int | None = None,
              e2e: bool = False, activation_checkpointing: bool = False, progress: bool = True,
              paper_shared: bool = False) -> list[dict]:
    """Train every block in turn (one in memory at a time), one block, the end-to-end baseline, or
    (for comparison only) the paper's shared layout (`dbcore.paper_shared`)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_store(cfg, store.open(store_path))
    _write_run_json(run, cfg, store_path, "e2e" if e2e else "paper-shared" if paper_shared else "blocks")
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
            from dbcore.chain import chain_states_for

            chain = chain_states_for(cfg, store_path, run, b)
        results.append(train_block(cfg, store_path, run, b, progress, chain))
    return results


def load_trained_block(run: Path, cfg: Config, block: int, emb: torch.Tensor) -> ViTBlock:
    """Construct block `block` alone and load its finished checkpoint."""
    base = run / f"block{block}"
    tensors, meta = checkpoint.load(base, prefix="model.")
    if not meta.get("done"):
        raise RunError(f"run {run}: block {block} has not finished training (step {meta.get('step')})")
    model = ViTBlock(cfg.model, block, emb)
    model.load_state_dict(tensors)
    return model.eval()
