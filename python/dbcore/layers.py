"""Transformer layers: DiT-style adaLN layer, noise embedder, plain pre-LN layer (METHOD.md 4).

Every layer maps (N, T, d) -> (N, T, d): blocks are set-to-set maps of width d.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NOISE_FREQ_DIM = 256  # width of the sinusoidal embedding of c_noise
NOISE_MAX_PERIOD = 10_000.0
NOISE_SCALE = 1_000.0  # c_noise = ln(s)/4 spans about [-1.6, 1.1]; spread it over the frequencies


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask), `scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, t, d = h.shape
        qkv = self.qkv(h).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (N, H, T, d/H) each
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, d/H)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """h * (1 + scale) + shift with h (N, T, d) and shift, scale (N, d)."""
    return h * (1 + scale[:, None]) + shift[:, None]


class AdaLNLayer(nn.Module):
    """DiT layer: pre-LN attention and MLP, shift/scale/gate of each from the noise embedding c.

    The modulation projection is zero-initialised, so a fresh layer is the identity.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h (N, T, d), c (N, d) -> (N, T, d)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        h = h + gate1[:, None] * self.attn(self._norm_modulate(self.norm1, h, shift1, scale1))
        h = h + gate2[:, None] * self.mlp(self._norm_modulate(self.norm2, h, shift2, scale2))
        return h

    @staticmethod
    def _norm_modulate(norm: nn.Module, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        # Memory: LN + modulate is recomputed in backward, so it saves only h (as a plain LN does)
        # instead of an extra (N, T, d) normalised copy; the cost is a few elementwise ops.
        if torch.is_grad_enabled() and h.requires_grad:
            return checkpoint(lambda x: modulate(norm(x), shift, scale), h, use_reentrant=False)
        return modulate(norm(h), shift, scale)


class AdaLNFinal(nn.Module):
    """Final LN with noise-dependent shift/scale, then Linear d -> out (all zero-initialised)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)
        for m in (self.modulation[1], self.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h (N, d), c (N, d) -> (N, out)."""
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm(h) * (1 + scale) + shift)


def sinusoidal_embedding(
    t: torch.Tensor, dim: int, max_period: float = NOISE_MAX_PERIOD
) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / (dim/2)); t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]  # (N, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class NoiseEmbedder(nn.Module):
    """c_noise (N,) -> sinusoidal(NOISE_SCALE * c_noise) -> MLP -> (N, d)."""

    def __init__(self, dim: int, freq_dim: int = NOISE_FREQ_DIM) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(NOISE_SCALE * c_noise, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class PreLNLayer(nn.Module):
    """Plain pre-LN transformer layer (the end-to-end baseline): h + attn(LN h), h + mlp(LN h)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, T, d) -> (N, T, d)."""
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))
