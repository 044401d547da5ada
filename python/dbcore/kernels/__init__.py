"""Fused CUDA kernels (CuPy + NVRTC) for block noise and per-block losses, behind a backend switch.

backend: "torch" (reference, any device), "cupy" (CUDA tensors, needs CuPy), "auto" (CuPy for CUDA
tensors when CuPy imports, else torch). CuPy is imported lazily: the package works without it.
"""

from __future__ import annotations

from typing import Literal

import torch

from dbcore.kernels import reference
from dbcore.kernels._cupy import BackendUnavailable, cupy_available

Backend = Literal["auto", "torch", "cupy"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "cupy")
Reduction = Literal["mean", "none"]

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "block_loss_ce",
    "block_loss_mse",
    "noise_and_input",
    "resolve_backend",
]


def resolve_backend(name: str, device: torch.device | str | None = None) -> str:
    """The concrete backend ("torch" or "cupy") for `name` and tensors on `device`.

    device None means "the tensors will be on the default CUDA device if there is one".
    Raises ValueError for an unknown name, BackendUnavailable when "cupy" can't run.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return "torch"
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if name == "auto":
        return "cupy" if on_cuda and cupy_available() else "torch"
    missing = []
    if not cupy_available():
        missing.append("CuPy (install the cuda extra: pip install 'dbcore[cuda]', cupy-cuda13x)")
    if not torch.cuda.is_available():
        missing.append("a CUDA device (torch sees none)")
    if missing:
        raise BackendUnavailable("backend 'cupy' needs " + " and ".join(missing))
    if not on_cuda:
        raise BackendUnavailable(f"backend 'cupy' needs CUDA tensors, got device {device}")
    return "cupy"


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def noise_and_input(
    y: torch.Tensor,
    sample_idx: torch.Tensor,
    seed: int,
    block: int,
    draw: int,
    lo: float,
    hi: float,
    dist: str = "lognormal",
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, c_in*z, sigma) for targets y (N, ...): sigma (N,) float32 from the block's range [lo, hi]
    and distribution, eps from the counter-based generator keyed by (seed, sample, block, draw)."""
    if resolve_backend(backend, y.device) == "torch":
        return reference.noise_and_input(y, sample_idx, seed, block, draw, lo, hi, dist)
    from dbcore.kernels.functions import NoiseAndInput

    return NoiseAndInput.apply(y, sample_idx, seed, block, draw, lo, hi, dist)


def block_loss_mse(
    z: torch.Tensor,
    raw: torch.Tensor,
    y: torch.Tensor,
    sigma: torch.Tensor,
    w: torch.Tensor,
    reduction: Reduction = "mean",
    backend: Backend = "auto",
) -> torch.Tensor:
    """w_i * mean((D_i - y_i)^2), D = c_skip*z + c_out*raw, averaged over samples for "mean"
    (equal to `dbcore.method.loss.weighted_mse(denoise(z, raw, sigma), y, w)`). sigma is a constant."""
    if sigma.requires_grad:
        raise ValueError("block_loss_mse treats sigma as a constant; pass sigma.detach()")
    if resolve_backend(backend, z.device) == "torch":
        per_sample = reference.mse_per_sample(z, raw, y, sigma, w)
    else:
        from dbcore.kernels.functions import MSELoss

        per_sample = MSELoss.apply(z, raw, y, sigma, w)
    return _reduce(per_sample, reduction)


def block_loss_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    w: torch.Tensor,
    reduction: Reduction = "mean",
    backend: Backend = "auto",
) -> torch.Tensor:
    """w_i * CE(logits_i, label_i) for logits (N, V), labels (N,), w (N,), averaged for "mean"
    (equal to `dbcore.method.loss.weighted_ce`); label -100 is ignored (loss 0, still counted in N)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if resolve_backend(backend, logits.device) == "torch":
        per_sample = reference.ce_per_sample(logits, labels, w)
    else:
        from dbcore.kernels.functions import CELoss

        per_sample = CELoss.apply(logits, labels, w)
    return _reduce(per_sample, reduction)
