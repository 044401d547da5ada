"""The paper's public-code training layout, kept only for comparison (`dbcore train --paper-shared`).

All blocks live in one model and share the patch and position embedding, the z projection, the
noise embedder, the output layer F and the head; one AdamW holds everything (so weight decay and
momentum also move blocks that did not train this step, METHOD.md section 10) and every step trains
one block chosen uniformly at random. Only activation memory shrinks; blocks cannot train apart.
Steps are B times the per-block budget, so each block sees as many steps as in independent mode.
The target embedding stays the frozen one of the cache (the public code also learns it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from dbcore import checkpoint, layout, store
from dbcore.config import Config
from dbcore.data import BatchStream
from dbcore.kernels import block_loss_ce, resolve_backend
from dbcore.loss import sample_weights
from dbcore.noise import noised_targets
from dbcore.recipes.vit import ViTBlock, ViTConfig

SHARED = ("patch_embed", "pos_embed", "z_embed", "noise_embed", "final", "head")
CHECKPOINT = "shared"


class SharedViT(nn.Module):
    """B ViT blocks whose non-layer parts are one set of modules; `blocks[b]` runs block b."""

    def __init__(self, cfg: ViTConfig, target_embedding: torch.Tensor) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ViTBlock(cfg, b, target_embedding) for b in range(cfg.num_blocks))
        first = self.blocks[0]
        for blk in self.blocks[1:]:
            for name in SHARED:
                setattr(blk, name, getattr(first, name))


def block_of_step(step: int, seed: int, num_blocks: int) -> int:
    """The block trained at `step`: uniform, a pure function of (seed, step) so runs resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(num_blocks, (1,), generator=g))


def train_paper_shared(cfg: Config, store_path: Path, run: Path, progress: bool = True) -> dict:
    from dbcore.train import _train_loop, images_to_tensor, read_target_embedding, resolve_device

    m, t = cfg.model, cfg.train
    device = resolve_device(t.device)
    backend = resolve_backend(t.backend, device)
    emb = read_target_embedding(store.open(store_path))
    torch.manual_seed(t.seed)
    model = SharedViT(m, emb).to(device)
    loop_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, steps=t.steps * m.num_blocks))
    noise_seed = int(store.open(store_path).attrs["noise"]["seed"])
    stream = BatchStream(store_path, [layout.IMAGES, layout.LABELS], t.batch_size, seed=t.seed,
                         drop_last=True)
    step_counter = {"step": 0}

    def step_loss(batch: dict) -> torch.Tensor:
        b = block_of_step(step_counter["step"], t.seed, m.num_blocks)
        step_counter["step"] += 1
        labels = torch.from_numpy(batch[layout.LABELS])
        idx = torch.from_numpy(batch["index"])
        # the generator's noise of (seed, sample, block, draw = epoch), as online training draws it
        z, sigma = noised_targets(emb[labels], idx, noise_seed, b, stream.epoch, m)
        x = images_to_tensor(batch[layout.IMAGES], device)
        _, logits = model.blocks[b](x, z.to(device), sigma.to(device))
        w = sample_weights(sigma.to(device), t.weight, t.weight_clamp)
        return block_loss_ce(logits, labels.to(device), w, backend=backend)

    base = run / CHECKPOINT
    if checkpoint.exists(base):
        step_counter["step"] = int(checkpoint.load_meta(base)["step"])
    return _train_loop(CHECKPOINT, model, step_loss, loop_cfg, run, stream, progress)


def load_shared(run: Path, cfg: Config) -> SharedViT:
    tensors, meta = checkpoint.load(run / CHECKPOINT, prefix="model.")
    model = SharedViT(cfg.model, tensors["blocks.0.target_embedding"])
    model.load_state_dict(tensors)
    return model.eval()
