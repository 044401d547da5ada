"""ViT classifier recipe (METHOD.md 4, 7): DiffusionBlocks blocks and the end-to-end baseline.

A block denoises the class embedding y = E[label]: the noisy target z takes the CLS position, F is
read there, `D = c_skip*z + c_out*F`, and a learned linear head maps D to logits. Each block owns
every trainable parameter it uses (patch and position embedding, noise embedder, layers, F, head),
so blocks train in separate processes with no communication. E is a frozen buffer.

Images x are (N, C, H, W) float in [0, 1]; both models map them to [-1, 1] themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dbcore.edm import precond
from dbcore.layers import AdaLNFinal, AdaLNLayer, NoiseEmbedder, PreLNLayer
from dbcore.loss import WeightMode, denoise, sample_weights, weighted_ce
from dbcore.partition import CONFIG_SIGMA_DISTS

PIXEL_MEAN = 0.5  # x in [0, 1] -> (x - mean) / std in [-1, 1]
PIXEL_STD = 0.5
POS_INIT_STD = 0.02


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
    sigma_dist: str = "lognormal"  # in-block sigma distribution, see dbcore.partition.CONFIG_SIGMA_DISTS

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
        if self.layer_split is not None:
            self.layer_split = [int(n) for n in self.layer_split]
        block_layers(self)  # validates depth, num_blocks and layer_split

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def block_layers(cfg: ViTConfig) -> list[int]:
    """Layers of each block in network order; they always sum to depth (no layer is dropped)."""
    if cfg.num_blocks < 1 or cfg.depth < 1:
        raise ValueError(f"need depth >= 1 and num_blocks >= 1, got {cfg.depth}, {cfg.num_blocks}")
    if cfg.layer_split is None:
        if cfg.depth % cfg.num_blocks:
            raise ValueError(
                f"depth {cfg.depth} is not divisible by num_blocks {cfg.num_blocks}; "
                "give layer_split explicitly"
            )
        return [cfg.depth // cfg.num_blocks] * cfg.num_blocks
    split = list(cfg.layer_split)
    if len(split) != cfg.num_blocks or sum(split) != cfg.depth or min(split) < 1:
        raise ValueError(
            f"layer_split {split} must have num_blocks={cfg.num_blocks} entries >= 1 "
            f"summing to depth={cfg.depth}"
        )
    return split


def layers_in_block(cfg: ViTConfig, block: int) -> int:
    if not 0 <= block < cfg.num_blocks:
        raise ValueError(f"block {block} is outside 0..{cfg.num_blocks - 1}")
    return block_layers(cfg)[block]


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


def make_target_embedding(
    num_classes: int, dim: int, seed: int, scale: float = 1.0
) -> torch.Tensor:
    """Frozen class embedding E (V, d) float32: seeded Gaussian rows scaled to norm `scale`."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    return (scale * e / e.norm(dim=1, keepdim=True)).float()


def noised_target(
    emb: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """z = E[label] + sigma * eps: (N, d) for labels (N,), sigma (N,), eps (N, d)."""
    return emb[labels] + sigma[:, None].to(emb.dtype) * eps.to(emb.dtype)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - PIXEL_MEAN) / PIXEL_STD


class ViTBlock(nn.Module):
    """One DiffusionBlock: denoiser of the class embedding over the noise range of `block_index`."""

    def __init__(self, cfg: ViTConfig, block_index: int, target_embedding: torch.Tensor) -> None:
        super().__init__()
        d = cfg.dim
        if tuple(target_embedding.shape) != (cfg.num_classes, d):
            raise ValueError(
                f"target embedding is {tuple(target_embedding.shape)}, "
                f"expected ({cfg.num_classes}, {d})"
            )
        self.cfg, self.block_index = cfg, block_index
        self.register_buffer("target_embedding", target_embedding.detach().float().clone())
        self.patch_embed = nn.Conv2d(cfg.channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, d) * POS_INIT_STD)
        self.z_embed = nn.Linear(d, d)  # the noisy target token c_in * z -> hidden
        # Zero-initialised weight: at high sigma c_in * z is pure noise (unit Gaussian entries), and
        # a default-initialised projection would put a random token at the readout position.
        nn.init.zeros_(self.z_embed.weight)
        self.noise_embed = NoiseEmbedder(d)
        n = layers_in_block(cfg, block_index)
        self.layers = nn.ModuleList(AdaLNLayer(d, cfg.heads, cfg.mlp_ratio, cfg.gate_init) for _ in range(n))
        self.final = AdaLNFinal(d, d)  # F, zero-initialised: a fresh block has D = c_skip * z
        self.head = nn.Linear(d, cfg.num_classes)  # learned readout of D

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) in [0, 1], z (N, d), sigma (N,) -> D (N, d), logits (N, V)."""
        sigma = sigma.to(z.dtype).reshape(-1).expand(z.shape[0])  # (N,); a scalar broadcasts
        p = precond(sigma)
        h_x = self.patch_embed(_normalize(x)).flatten(2).transpose(1, 2)  # (N, T, d)
        h_z = self.z_embed(p.c_in[:, None] * z)[:, None]  # (N, 1, d) at the CLS position
        h = torch.cat([h_z, h_x], dim=1) + self.pos_embed  # (N, T+1, d)
        c = self.noise_embed(p.c_noise)  # (N, d)
        for layer in self.layers:
            h = layer(h, c)
        raw = self.final(h[:, 0].contiguous(), c)  # F (N, d); a view would keep all of h saved
        d_hat = denoise(z, raw, sigma)  # D = c_skip*z + c_out*F, (N, d)
        return d_hat, self.head(d_hat)


def block_loss(
    block: ViTBlock,
    x: torch.Tensor,
    labels: torch.Tensor,
    z: torch.Tensor,
    sigma: torch.Tensor,
    weight_mode: WeightMode = "edm",
    clamp_max: float = 100.0,
) -> torch.Tensor:
    """mean_i w(sigma_i) * CE(block(x_i, z_i, sigma_i), label_i), weighted per sample."""
    _, logits = block(x, z, sigma)
    return weighted_ce(logits, labels, sample_weights(sigma.float(), weight_mode, clamp_max))


class ViTClassifier(nn.Module):
    """End-to-end baseline: the same depth L and width d, plain pre-LN layers, CLS token, CE."""

    def __init__(self, cfg: ViTConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        d = cfg.dim
        self.cfg, self.activation_checkpointing = cfg, activation_checkpointing
        self.patch_embed = nn.Conv2d(cfg.channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, d) * POS_INIT_STD)
        self.layers = nn.ModuleList(
            PreLNLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) in [0, 1] -> logits (N, V)."""
        h_x = self.patch_embed(_normalize(x)).flatten(2).transpose(1, 2)  # (N, T, d)
        h = torch.cat([self.cls_token.expand(len(x), -1, -1), h_x], dim=1) + self.pos_embed
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        # contiguous: a view of h[:, 0] would keep all of h (N, T, d) saved for the norm's backward
        return self.head(self.norm(h[:, 0].contiguous()))
