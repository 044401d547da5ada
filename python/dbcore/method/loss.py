"""Per-block denoising loss, PyTorch reference (METHOD.md sections 2 and 4).

`D = c_skip*z + c_out*F`, then a per-sample loss weighted per sample: `mean_i w_i * loss_i`.
The CUDA kernels (`cuda/`) implement the same semantics; this module is their oracle.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from dbcore.method.edm import denoise, loss_weight

__all__ = ["WEIGHT_MODES", "denoise", "sample_weights", "weighted_ce", "weighted_mse"]

WeightMode = Literal["none", "edm", "normalized", "clamped"]
WEIGHT_MODES: tuple[str, ...] = ("none", "edm", "normalized", "clamped")


def sample_weights(sigma: torch.Tensor, mode: WeightMode, clamp_max: float = 100.0) -> torch.Tensor:
    """Per-sample weights (N,) for a batch of sigmas (N,).

    none: 1; edm: w(s); normalized: w(s) / mean_batch w(s); clamped: min(w(s), clamp_max).
    """
    if mode == "none":
        return torch.ones_like(sigma)
    w = loss_weight(sigma)
    if mode == "edm":
        return w
    if mode == "normalized":
        return w / w.mean()
    if mode == "clamped":
        return w.clamp(max=clamp_max)
    raise ValueError(f"loss weight mode must be one of {WEIGHT_MODES}, got {mode!r}")


def weighted_mse(d: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean_i w_i * mean_elements (D_i - y_i)^2 for D, y (N, ...) and w (N,)."""
    per_sample = (d - y).pow(2).flatten(1).mean(dim=1)  # (N,)
    return (w * per_sample).mean()


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean_i w_i * CE(logits_i, label_i) for logits (N, V), labels (N,), w (N,)."""
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")  # (N,)
    return (w * per_sample).mean()
