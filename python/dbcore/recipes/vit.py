"""ViT classifier recipe (METHOD.md 4, 7): DiffusionBlocks blocks and the end-to-end baseline.

A block denoises the class embedding y = E[label]: the noisy target z takes the CLS position, F is
read there, `D = c_skip*z + c_out*F`, and a learned linear head maps D to logits. Each block owns
every trainable parameter it uses (patch and position embedding, noise embedder, layers, F, head),
so blocks train in separate processes with no communication. E is a frozen buffer.

Images x are (N, C, H, W) float in [0, 1]; both models map them to [-1, 1] themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dbcore.kernels import block_loss_ce
from dbcore.method import layout
from dbcore.method.batch import INDEX, NoiseRequest
from dbcore.method.edm import EDMPrecond
from dbcore.method.noise import mix_targets
from dbcore.method.partition import CONFIG_SIGMA_DISTS, block_layers, layers_in_block
from dbcore.method.sampler import DECODES, initial_noise, run_chain
from dbcore.models.images import check_image_source, example_image_batch
from dbcore.models.layers import (
    CONDITIONINGS,
    MODULATION_RANK,
    AdaLNFinal,
    AdaLNLayer,
    NoiseEmbedder,
    PreLNLayer,
    checkpointed,
    make_target_embedding,
)
from dbcore.recipes.base import Recipe

EVAL_BATCH = 512

PIXEL_MEAN = 0.5  # x in [0, 1] -> (x - mean) / std in [-1, 1]
PIXEL_STD = 0.5
POS_INIT_STD = 0.02
CLS = slice(0, 1)  # the row the readout reads: the class token (baseline) or the noisy target (block)


@dataclass
class ViTConfig:
    """Model table of a ViT run; L = depth layers split into B = num_blocks blocks."""

    image_size: int = 8
    channels: int = 1
    patch_size: int = 2
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    num_blocks: int = 2
    layer_split: list[int] | None = None  # layers per block, network order; None = depth / B each
    gamma: float = 0.05  # overlap of the block ranges (METHOD.md 3)
    target_scale: float = 1.0  # norm of the rows of E
    gate_init: float = 0.0  # adaLN gates at initialisation: 0 = DiT's adaLN-Zero, 1 = a plain pre-LN layer
    sigma_dist: str = "lognormal"  # in-block sigma law: method.partition.CONFIG_SIGMA_DISTS
    conditioning: str = "adaln"  # "adaln-single": a noise embedding of width modulation_rank, not dim
    modulation_rank: int = MODULATION_RANK  # adaln-single: that width r

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.sigma_dist not in CONFIG_SIGMA_DISTS:
            raise ValueError(f"sigma_dist must be one of {CONFIG_SIGMA_DISTS}, got {self.sigma_dist!r}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.target_scale <= 0:
            raise ValueError(f"target_scale must be > 0, got {self.target_scale}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        if self.modulation_rank < 1:
            raise ValueError(f"modulation_rank must be >= 1, got {self.modulation_rank}")
        if self.layer_split is not None:
            self.layer_split = [int(n) for n in self.layer_split]
        block_layers(self)  # validates depth, num_blocks and layer_split

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def vit_tiny(**overrides) -> ViTConfig:
    """sklearn digits, 8x8x1: 16 patches of 2x2, 4 layers of width 64, B = 2."""
    return dataclasses.replace(ViTConfig(), **overrides)


def vit_mnist(**overrides) -> ViTConfig:
    """MNIST 28x28x1 (the METHOD.md 9 prototype): patches of 7, 8 layers of width 96, B = 4."""
    cfg = ViTConfig(image_size=28, channels=1, patch_size=7, dim=96, depth=8, heads=4, num_blocks=4)
    return dataclasses.replace(cfg, **overrides)


def vit_cifar(**overrides) -> ViTConfig:
    """CIFAR-100 32x32x3 (the paper's setting): patches of 4, 12 layers of width 128, B = 3."""
    cfg = ViTConfig(
        image_size=32, channels=3, patch_size=4, dim=128, depth=12, heads=4, num_classes=100,
        num_blocks=3,
    )
    return dataclasses.replace(cfg, **overrides)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - PIXEL_MEAN) / PIXEL_STD


def patch_tokens(patch_embed: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) in [0, 1], or uint8 images (N, H, W, C) -> patch tokens (N, T, d).

    From uint8 images with gradients on, backward rebuilds the normalised float copy that the
    convolution reads instead of keeping it (4 bytes a pixel; the images are kept anyway). Called
    as a temporary: no local name keeps the convolution's output alive beside the sequence."""
    if x.dtype != torch.uint8:
        return patch_embed(_normalize(x)).flatten(2).transpose(1, 2)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return patch_embed(_normalize(images_to_float(images))).flatten(2).transpose(1, 2)

    return checkpointed(embed, x) if torch.is_grad_enabled() else embed(x)


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1], on the images' device."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


class ViTBackbone(nn.Module):
    """F of one block: image patches and the noisy target token c_in*z at the CLS position."""

    def __init__(self, cfg: ViTConfig, num_layers: int) -> None:
        super().__init__()
        d = cfg.dim
        self.patch_embed = nn.Conv2d(cfg.channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, d) * POS_INIT_STD)
        self.z_embed = nn.Linear(d, d)  # the noisy target token c_in * z -> hidden
        # Zero-initialised weight: at high sigma c_in * z is pure noise (unit Gaussian entries), and
        # a default-initialised projection would put a random token at the readout position.
        nn.init.zeros_(self.z_embed.weight)
        # adaln: a noise embedding c (N, d) that every layer projects to its modulation; adaln-single:
        # c of width r, so each projection has 6d(r + 1) parameters instead of 6d(d + 1)
        single = cfg.conditioning == "adaln-single"
        cond = cfg.modulation_rank if single else d
        self.noise_embed = NoiseEmbedder(cond, hidden=not single)
        self.layers = nn.ModuleList(
            AdaLNLayer(d, cfg.heads, cfg.mlp_ratio, cfg.gate_init, cond_dim=cond) for _ in range(num_layers))
        self.final = AdaLNFinal(d, d, cond)  # F, zero-initialised: a fresh block has D = c_skip * z

    def forward(self, z_in: torch.Tensor, c_noise: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """c_in*z (N, d), c_noise (N,), x (N, C, H, W) in [0, 1] or uint8 (N, H, W, C) -> F (N, d)."""
        h_z = self.z_embed(z_in)[:, None]  # (N, 1, d) at the CLS position
        h = torch.cat([h_z, patch_tokens(self.patch_embed, x)], dim=1) + self.pos_embed  # (N, T+1, d)
        c = self.noise_embed(c_noise)  # (N, d) or (N, r)
        *body, last = self.layers
        for layer in body:
            h = layer(h, c)
        h = last.forward_rows(h, c, CLS)  # (N, 1, d): F is read at the CLS row alone
        return self.final(h[:, 0], c)  # (N, d)


class ViTBlock(nn.Module):
    """One DiffusionBlock: denoiser of the class embedding over the noise range of `block_index`."""

    def __init__(self, cfg: ViTConfig, block_index: int, target_embedding: torch.Tensor) -> None:
        super().__init__()
        if tuple(target_embedding.shape) != (cfg.num_classes, cfg.dim):
            raise ValueError(
                f"target embedding is {tuple(target_embedding.shape)}, "
                f"expected ({cfg.num_classes}, {cfg.dim})"
            )
        self.cfg, self.block_index = cfg, block_index
        self.register_buffer("target_embedding", target_embedding.detach().float().clone())
        self.denoiser = EDMPrecond(ViTBackbone(cfg, layers_in_block(cfg, block_index)))
        self.head = nn.Linear(cfg.dim, cfg.num_classes)  # learned readout of D

    @property
    def layers(self) -> nn.ModuleList:
        return self.denoiser.backbone.layers

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) in [0, 1] or uint8 (N, H, W, C), z (N, d), sigma (N,) or scalar ->
        D (N, d), logits (N, V)."""
        d_hat = self.denoiser(z, sigma, x)  # D = c_skip*z + c_out*F, (N, d)
        return d_hat, self.head(d_hat)


class ViTClassifier(nn.Module):
    """End-to-end baseline: the same depth L and width d, plain pre-LN layers, CLS token, CE."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, d) * POS_INIT_STD)
        self.layers = nn.ModuleList(
            PreLNLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) in [0, 1] or uint8 (N, H, W, C) -> logits (N, V)."""
        cls = self.cls_token.expand(len(x), -1, -1)  # (N, 1, d)
        h = torch.cat([cls, patch_tokens(self.patch_embed, x)], dim=1) + self.pos_embed  # (N, T+1, d)
        *body, last = self.layers
        for layer in body:
            h = layer(h)  # (N, T, d)
        h = last.forward_rows(h, CLS)  # the logits read the CLS row alone: (N, 1, d)
        return self.head(self.norm(h[:, 0]))


def _checked_embedding(rows: np.ndarray, num_classes: int, dim: int) -> torch.Tensor:
    rows = np.asarray(rows)
    if rows.shape != (num_classes, dim):
        raise ValueError(f"target embedding: expected shape ({num_classes}, {dim}) (num_classes, dim), "
                         f"found {rows.shape}")
    if not np.issubdtype(rows.dtype, np.floating) or not np.isfinite(rows).all():
        raise ValueError(f"target embedding: expected finite floats, found {rows.dtype}")
    return torch.from_numpy(rows.astype(np.float32))


class ViTRecipe(Recipe):
    """ViT classifier: discrete target E[label], CE on the head's logits, Euler over softmax @ E."""

    name = "vit"
    config_class = ViTConfig
    stream_arrays = (layout.IMAGES, layout.LABELS)
    augmented = layout.IMAGES
    cond_arrays = (layout.IMAGES,)
    frozen_arrays = (layout.TARGET_EMBEDDING,)
    cache_fields = ("image_size", "channels", "num_classes", "dim", "target_scale")

    def cache_arrays(self, source, seed, target_embedding):
        m = self.model_cfg
        check_image_source(source, m.image_size, m.channels, m.num_classes)
        if target_embedding is None:
            emb = make_target_embedding(m.num_classes, m.dim, seed, m.target_scale)  # (V, d)
            attrs = {"kind": "seeded-random", "seed": seed, "scale": m.target_scale}
        else:
            emb = _checked_embedding(target_embedding, m.num_classes, m.dim)
            attrs = {"kind": "file", "sha256": hashlib.sha256(emb.numpy().tobytes()).hexdigest()}
        arrays = {layout.IMAGES: source.images, layout.LABELS: source.labels,
                  layout.TARGET_EMBEDDING: emb.numpy()}
        return arrays, {"target_embedding": attrs}

    def target_shape(self, frozen):
        return (self.model_cfg.dim,)

    def noise_request(self, target_shape):
        return NoiseRequest(gaussians=math.prod(target_shape), uniforms=1)

    def targets(self, batch, frozen):
        return frozen[layout.TARGET_EMBEDDING][batch[layout.LABELS]]  # E[label], (N, d)

    def train_targets(self, y, batch, frozen, block, draw):
        t = self.cfg.train
        if t.mix_fraction <= 0:
            return y
        return mix_targets(frozen[layout.TARGET_EMBEDDING], batch[layout.LABELS], batch[INDEX], t.seed,
                           block, draw, t.mix_fraction)

    def build_block(self, block, frozen):
        return ViTBlock(self.model_cfg, block, frozen[layout.TARGET_EMBEDDING])

    def build_e2e(self, frozen):
        return ViTClassifier(self.model_cfg)

    def block_loss(self, block, batch, noised, w, backend="torch"):
        _, logits = block(batch[layout.IMAGES], noised.z, noised.sigma)  # (N, V)
        return block_loss_ce(logits, batch[layout.LABELS], w, backend=backend)

    def e2e_loss(self, model, batch, noised, w, backend="torch"):
        return F.cross_entropy(model(batch[layout.IMAGES]), batch[layout.LABELS])

    def example_frozen(self, seed=0):
        m = self.model_cfg
        return {layout.TARGET_EMBEDDING: make_target_embedding(m.num_classes, m.dim, seed, m.target_scale)}

    def example_batch(self, batch_size, frozen, device):
        return example_image_batch(self.model_cfg, batch_size, device)

    def denoise_step(self, block, cond, z, sigma, options):
        _, logits = block(images_to_float(cond[layout.IMAGES]), z, sigma)  # (N, V)
        d_hat = torch.softmax(logits.float(), dim=-1) @ block.target_embedding.float()  # (N, d)
        return d_hat, logits

    def evaluate(self, load_block, e2e, source, options):
        """accuracy and loss (CE of the prediction's scores); along a chain, `per_block`: the
        accuracy of each block's last logits and of the running product of beliefs."""
        m, t = self.model_cfg, self.cfg.train
        check_image_source(source, m.image_size, m.channels, m.num_classes)
        images, labels = torch.from_numpy(np.array(source.images)), torch.from_numpy(np.array(source.labels))
        t0 = time.perf_counter()
        per_block: list[dict] = []
        steps = decode = None
        if e2e is not None:
            with torch.no_grad():
                scores = torch.cat([e2e(images_to_float(xb)) for xb in images.split(EVAL_BATCH)]).float()
        else:
            steps = options.steps or t.inference_steps or m.num_blocks
            decode = options.decode or t.decode
            if decode not in DECODES:
                raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
            n = len(labels)
            product, last = torch.zeros(n, m.num_classes), torch.zeros(n, m.num_classes)

            def observe(b: int, rows: slice, i: int, logits: torch.Tensor | None) -> None:
                assert logits is not None
                product[rows] += torch.log_softmax(logits.float(), dim=-1).cpu()
                last[rows] = logits.float().cpu()

            def block_done(b: int) -> None:
                per_block.append({"block": b, "accuracy_last": _accuracy(last, labels),
                                  "accuracy_product": _accuracy(product, labels)})

            z0 = initial_noise(torch.arange(n), (m.dim,), m.num_blocks, t.seed)
            run_chain(self, load_block, {layout.IMAGES: images}, z0, m.num_blocks, steps,
                      batch_size=EVAL_BATCH, observe=observe, block_done=block_done)
            scores = product if decode == "product" else last
        return {
            "accuracy": _accuracy(scores, labels, digits=None),
            "loss": float(F.cross_entropy(scores, labels)),
            "num_samples": len(labels),
            "inference_steps": steps,
            "decode": decode,
            "seconds": round(time.perf_counter() - t0, 3),
            "per_block": per_block,
        }


def _accuracy(scores: torch.Tensor, labels: torch.Tensor, digits: int | None = 6) -> float:
    acc = float((scores.argmax(dim=1) == labels).float().mean())
    return acc if digits is None else round(acc, digits)
