"""Class-conditional DiT networks (METHOD.md 4, 11 "DiT"): DiffusionBlocks blocks and the E2E baseline.

A block denoises an image y in [-1, 1] over its own noise range: the raw network F sees the patches of
`c_in * z` and is conditioned on c = noise embedding + class embedding through adaLN-Zero layers;
`D = c_skip*z + c_out*F` (`dbcore.method.edm.EDMPrecond`). Each block owns every trainable parameter it uses
(patch embedding, noise and label embedders, layers, final layer), so blocks train apart. Positions
are fixed 2-D sin-cos tables (a non-persistent buffer, as in DiT), not parameters.

Classifier-free guidance: row `num_classes` of the label table is the null class. Training drops
labels with `drop_labels` and a mask the caller draws; the models hold no randomness of their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from dbcore.method.edm import EDMPrecond
from dbcore.method.partition import CONFIG_SIGMA_DISTS, block_layers, layers_in_block
from dbcore.models.layers import LN_EPS, AdaLNLayer, NoiseEmbedder, checkpointed, norm_modulate

LABEL_INIT_STD = 0.02  # DiT's init of the label table (default of `label_init_std`) and of the noise MLP
POS_MAX_PERIOD = 10_000.0


@dataclass
class DiTConfig:
    """Model table of a DiT run; L = depth layers split into B = num_blocks blocks."""

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
    sigma_dist: str = "lognormal"  # in-block sigma law: method.partition.CONFIG_SIGMA_DISTS
    class_drop: float = 0.1  # probability that training replaces the class by the null class
    gate_init: float = 0.0  # adaLN gates at initialisation: 0 = DiT's adaLN-Zero
    label_init_std: float = LABEL_INIT_STD  # class table init; 1.0 starts it on the noise embedding's scale
    cfg_scale: float = 2.0  # sampling: classifier-free guidance scale on D (1 = no guidance)
    sample_steps: int = 50  # sampling: Euler steps in all, allotted equally to blocks
    sampler: str = "euler"  # sampling: "euler" (the paper's) or "heun" (EDM's second order, ours)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.dim % 4:
            raise ValueError(f"dim {self.dim} must be a multiple of 4 (2-D sin-cos positions)")
        if self.sigma_dist not in CONFIG_SIGMA_DISTS:
            raise ValueError(f"sigma_dist must be one of {CONFIG_SIGMA_DISTS}, got {self.sigma_dist!r}")
        if self.sampler not in ("euler", "heun"):
            raise ValueError(f"sampler must be 'euler' or 'heun', got {self.sampler!r}")
        if self.sample_steps < self.num_blocks:
            raise ValueError(f"sample_steps {self.sample_steps} must be >= num_blocks {self.num_blocks}")
        if not 0 <= self.class_drop < 1:
            raise ValueError(f"class_drop must be in [0, 1), got {self.class_drop}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.layer_split is not None:
            self.layer_split = [int(n) for n in self.layer_split]
        block_layers(self)  # validates depth, num_blocks and layer_split

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.channels


def dit_tiny(**overrides) -> DiTConfig:
    """sklearn digits, 8x8x1: 16 patches of 2x2, 4 layers of width 64, B = 2."""
    return dataclasses.replace(DiTConfig(), **overrides)


def dit_mnist(**overrides) -> DiTConfig:
    """MNIST 28x28x1: 49 patches of 4x4, 6 layers of width 128, B = 3."""
    cfg = DiTConfig(image_size=28, channels=1, patch_size=4, dim=128, depth=6, heads=4, num_blocks=3)
    return dataclasses.replace(cfg, **overrides)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, p*p*C), tokens in row-major grid order, each patch as (p, p, C)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)  # (N, C, H/p, p, W/p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (N, H/p, W/p, p, p, C)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(t: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, H, W), the inverse of `patchify`."""
    n = t.shape[0]
    x = t.reshape(n, h // p, w // p, p, p, c)  # (N, H/p, W/p, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, H/p, p, W/p, p)
    return x.reshape(n, c, h, w)


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(pos w_k), cos(pos w_k)] with w_k = max_period^(-k / (dim/2)); pos (M,) -> (M, dim)."""
    omega = POS_MAX_PERIOD ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    args = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed positions of a grid x grid token map: half the width per axis -> (grid*grid, dim) float32."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([sincos_1d(rows.reshape(-1), dim // 2), sincos_1d(cols.reshape(-1), dim // 2)], dim=1)
    return emb.float()  # (T, d)


def drop_labels(labels: torch.Tensor, drop_mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels (N,) with the null class `num_classes` wherever drop_mask (N,) bool is True."""
    return torch.where(drop_mask, torch.full_like(labels, num_classes), labels)


class LabelEmbedder(nn.Module):
    """Class label (N,) -> (N, d); row `num_classes` is the null class of classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int, init_std: float = LABEL_INIT_STD) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=init_std)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)


class DiTFinal(nn.Module):
    """Per-token final layer: LN (no affine), shift/scale from c, Linear d -> out; all zero-initialised."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)
        for m in (self.modulation[1], self.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h (N, T, d), c (N, d) -> (N, T, out)."""
        shift, scale = self.modulation(c).chunk(2, dim=-1)  # (N, d) each
        return self.linear(norm_modulate(h, shift, scale, LN_EPS))  # (N, T, out)


class DiTBackbone(nn.Module):
    """The raw network F of a DiT denoiser with `num_layers` adaLN-Zero layers."""

    def __init__(self, cfg: DiTConfig, num_layers: int) -> None:
        super().__init__()
        d, p = cfg.dim, cfg.patch_size
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, d, p, stride=p)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened patch
        nn.init.zeros_(self.patch_embed.bias)
        self.register_buffer("pos_embed", sincos_2d(cfg.grid_size, d)[None], persistent=False)  # (1, T, d)
        self.noise_embed = NoiseEmbedder(d)
        for m in self.noise_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=LABEL_INIT_STD)
        self.label_embed = LabelEmbedder(cfg.num_classes, d, cfg.label_init_std)
        self.layers = nn.ModuleList(
            AdaLNLayer(d, cfg.heads, cfg.mlp_ratio, cfg.gate_init) for _ in range(num_layers)
        )
        self.final = DiTFinal(d, cfg.patch_dim)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x_in = c_in*z (N, C, H, W), c_noise (N,), labels (N,) long -> F (N, C, H, W)."""
        cfg = self.cfg
        h = self.patch_embed(x_in).flatten(2).transpose(1, 2)  # (N, T, d)
        h = h + self.pos_embed.to(h.dtype)  # (N, T, d)
        c = self.noise_embed(c_noise) + self.label_embed(labels)  # (N, d)
        for layer in self.layers:
            h = layer(h, c)  # (N, T, d)
        if torch.is_grad_enabled() and self.training:
            # recomputed in backward: the modulated copy of h (N, T, d) is not kept for the Linear,
            # which would otherwise cost each block as much as a layer's residual stream
            out = checkpointed(self.final, h, c)  # (N, T, p*p*C)
        else:
            out = self.final(h, c)  # (N, T, p*p*C)
        return unpatchify(out, cfg.patch_size, cfg.channels, cfg.image_size, cfg.image_size)  # (N, C, H, W)


class DiTDenoiser(nn.Module):
    """EDM-preconditioned DiT with `num_layers` layers: D(z, sigma, label) = c_skip z + c_out F."""

    def __init__(self, cfg: DiTConfig, num_layers: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.denoiser = EDMPrecond(DiTBackbone(cfg, num_layers))

    @property
    def backbone(self) -> DiTBackbone:
        return self.denoiser.backbone

    @property
    def layers(self) -> nn.ModuleList:
        return self.denoiser.backbone.layers

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z (N, C, H, W), sigma (N,) or scalar, labels (N,) long -> D (N, C, H, W)."""
        return self.denoiser(z, sigma, labels)

    def forward_with_cfg(
        self, z: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, cfg_scale: float
    ) -> torch.Tensor:
        """Guided D = D_uncond + s (D_cond - D_uncond), both halves in one forward of 2N samples."""
        n = z.shape[0]
        sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).reshape(-1).expand(n)  # (N,)
        null = torch.full_like(labels, self.null_class)  # (N,)
        d = self(torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([labels, null]))  # (2N, C, H, W)
        d_cond, d_uncond = d.chunk(2)  # (N, C, H, W) each
        return d_uncond + cfg_scale * (d_cond - d_uncond)


class DiTBlock(DiTDenoiser):
    """One DiffusionBlock: the denoiser of the noise range of `block_index`, with its share of layers."""

    def __init__(self, cfg: DiTConfig, block_index: int) -> None:
        super().__init__(cfg, layers_in_block(cfg, block_index))
        self.block_index = block_index


class DiTModel(DiTDenoiser):
    """End-to-end baseline: all `cfg.depth` layers, trained over the whole noise range."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__(cfg, cfg.depth)
