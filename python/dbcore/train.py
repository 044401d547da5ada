"""`dbcore train`: train each block alone (or the end-to-end baseline) from a cache store.

One block in memory at a time: its own model, AdamW, warmup + cosine LR and checkpoint. A run
directory holds `run.json`, `block{b}.safetensors/.json` (or `e2e.*`), `metrics.jsonl` and, in
sequential mode, the chain states of earlier blocks (`chain/`). Interrupted runs resume from the
last checkpoint and end bit-identical to an uninterrupted one: batch order is a function of
(seed, epoch) and noise of (seed, sample, block, draw), and the LR is a function of the step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from dbcore import checkpoint, layout, store
from dbcore.config import Config
from dbcore.kernels import block_loss_ce, resolve_backend
from dbcore.loss import sample_weights
from dbcore.noise import noised_targets
from dbcore.recipes.vit import ViTBlock, ViTClassifier

LOG_EVERY = 25


class RunError(RuntimeError):
    """A run directory, store or config that do not fit together."""


@dataclass
class Dataset:
    """The cache held in memory as tensors (small sources; streaming is `dbcore.data`)."""

    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64
    emb: torch.Tensor  # (V, d) float32
    store: store.Store

    @classmethod
    def open(cls, path: Path) -> Dataset:
        s = store.open(path)
        images = s.read(layout.IMAGES, slice(None))  # (N, H, W, C) uint8
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        labels = torch.from_numpy(s.read(layout.LABELS, slice(None))).long()
        emb = torch.from_numpy(s.read(layout.TARGET_EMBEDDING, slice(None))).float()
        return cls(images=x, labels=labels, emb=emb, store=s)

    def __len__(self) -> int:
        return len(self.labels)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup then cosine decay to zero; a pure function of the step (resumable)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> tuple[torch.Tensor, int]:
    """Sample indices of `step` and its epoch: a fresh permutation per (seed, epoch), last batch dropped."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * batch_size : (pos + 1) * batch_size], epoch


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


def _resume(base: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    if not checkpoint.exists(base):
        return 0
    tensors, meta = checkpoint.load(base)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optim(opt, {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["param_groups"])
    return int(meta["step"])


def _log(run: Path, record: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


# ----------------------------------------------------------------------------- the loops


def _train_loop(name, model, step_loss, cfg: Config, run: Path, n: int, progress: bool) -> dict:
    """Shared loop of a block and of the end-to-end model: LR, clipping, checkpoints, metrics."""
    t = cfg.train
    base = run / name
    opt = make_optimizer(model, cfg)
    start = _resume(base, model, opt)
    meta = {"name": name, "total_steps": t.steps, "config_fingerprint": cfg.fingerprint()}
    if start >= t.steps:
        return {"name": name, "resumed_at": start, "steps": 0}
    bar = tqdm(total=t.steps, initial=start, desc=name, disable=not progress, unit="step")
    t0, loss_sum, loss_count = time.perf_counter(), 0.0, 0
    for step in range(start, t.steps):
        idx, epoch = batch_indices(step, n, t.batch_size, t.seed)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = step_loss(idx, epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
        bar.update(1)
        done = step + 1
        if done % LOG_EVERY == 0 or done == t.steps:
            _log(run, {"name": name, "step": done, "loss": loss_sum / loss_count, "lr": lr,
                       "elapsed_s": round(time.perf_counter() - t0, 3)})
            bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}")
            loss_sum, loss_count = 0.0, 0
        if done % t.checkpoint_every == 0 or done == t.steps:
            _save(base, model, opt, {**meta, "step": done, "done": done == t.steps})
    bar.close()
    return {"name": name, "resumed_at": start, "steps": t.steps - start,
            "seconds": round(time.perf_counter() - t0, 3)}


def train_block(cfg: Config, data: Dataset, run: Path, block: int, progress: bool = True,
                chain: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Train network block `block` alone. `chain`: (z, sigma) states handed by earlier blocks."""
    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed * 1009 + block)
    model = ViTBlock(m, block, data.emb)
    noise = data.store.attrs["noise"]
    seed, draws = noise["seed"], noise["draws"]
    backend = resolve_backend(t.backend)

    def step_loss(idx: torch.Tensor, epoch: int) -> torch.Tensor:
        labels = data.labels[idx]
        if draws:  # cached noise: this epoch's draw
            k = epoch % draws
            rows = idx.numpy()
            z = torch.from_numpy(data.store.read(layout.noised_z(block), rows)[:, k])
            sigma = torch.from_numpy(data.store.read(layout.noised_sigma(block), rows)[:, k])
        else:  # online noise: draw = epoch, the same values a cache with K > epoch holds
            z, sigma = noised_targets(data.emb[labels], idx, seed, block, epoch, m, backend)
        if chain is not None:
            take = int(round(t.sequential_fraction * len(idx)))
            z, sigma = z.clone(), sigma.clone()
            z[:take], sigma[:take] = chain[0][idx[:take]], chain[1][idx[:take]]
        _, logits = model(data.images[idx], z, sigma)
        w = sample_weights(sigma, t.weight, t.weight_clamp)
        return block_loss_ce(logits, labels, w, backend=backend)

    return _train_loop(f"block{block}", model, step_loss, cfg, run, len(data), progress)


def train_e2e(cfg: Config, data: Dataset, run: Path, progress: bool = True,
              activation_checkpointing: bool = False) -> dict:
    torch.manual_seed(cfg.train.seed)
    model = ViTClassifier(cfg.model, activation_checkpointing=activation_checkpointing)

    def step_loss(idx: torch.Tensor, epoch: int) -> torch.Tensor:
        return nn.functional.cross_entropy(model(data.images[idx]), data.labels[idx])

    return _train_loop("e2e", model, step_loss, cfg, run, len(data), progress)


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
              e2e: bool = False, activation_checkpointing: bool = False, progress: bool = True) -> list[dict]:
    """Train every block in turn (one in memory at a time), one block, or the end-to-end baseline."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = Dataset.open(store_path)
    check_store(cfg, data.store)
    _write_run_json(run, cfg, store_path, "e2e" if e2e else "blocks")
    if e2e:
        return [train_e2e(cfg, data, run, progress, activation_checkpointing)]
    num_blocks = cfg.model.num_blocks
    blocks = range(num_blocks) if block is None else [block]
    if block is not None and not 0 <= block < num_blocks:
        raise RunError(f"--block {block} is outside 0..{num_blocks - 1}")
    results = []
    for b in blocks:
        chain = None
        if cfg.train.mode == "sequential" and b > 0:
            from dbcore.chain import chain_states_for

            chain = chain_states_for(cfg, data, run, b, progress)
        results.append(train_block(cfg, data, run, b, progress, chain))
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
