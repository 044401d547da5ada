"""PyTorch reference of every kernel: the oracle of the tests and the CPU backend."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dbcore.method import rng
from dbcore.method.edm import add_noise, precond
from dbcore.method.loss import denoise
from dbcore.method.partition import SIGMA_DISTS, cdf, sample_sigma_in_range

DIST_CODES: dict[str, int] = {"lognormal": 0, "loguniform": 1}  # enum of cuda/dbcore_math.cuh


def dist_params(dist: str, lo: float, hi: float) -> tuple[int, float, float]:
    """(code, a, b) of `dbc_sigma`: Phi(lo), Phi(hi) for lognormal, ln lo, ln hi for loguniform."""
    if dist == "lognormal":
        return DIST_CODES[dist], cdf(lo), cdf(hi)
    if dist == "loguniform":
        return DIST_CODES[dist], math.log(lo), math.log(hi)
    raise ValueError(f"sigma distribution must be one of {SIGMA_DISTS}, got {dist!r}")


def sigma_of_samples(
    sample_idx: torch.Tensor, seed: int, block: int, draw: int, lo: float, hi: float, dist: str
) -> torch.Tensor:
    """Sigma (N,) float64 on the CPU for each sample, from the generator's sigma uniform."""
    u = rng.uniform_for_sigma(sample_idx.detach().cpu(), seed, block, draw)
    return sample_sigma_in_range(u, lo, hi, dist)


def noise_and_input(
    y: torch.Tensor,
    sample_idx: torch.Tensor,
    seed: int,
    block: int,
    draw: int,
    lo: float,
    hi: float,
    dist: str = "lognormal",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z = y + sigma*eps, c_in*z, sigma float32) for targets y (N, ...) (METHOD.md 2-3)."""
    s = sample_idx.detach().cpu().to(torch.int64)
    sigma = sigma_of_samples(s, seed, block, draw, lo, hi, dist)  # (N,) float64
    eps = rng.gaussian(s, y[0].numel() if len(y) else 0, seed, block, draw)
    sig = sigma.to(y.device).view(-1, *([1] * (y.dim() - 1)))
    z = add_noise(y, sig, eps.to(y.device))
    c_in_z = (precond(sig).c_in * z.double()).to(y.dtype)
    return z, c_in_z, sigma.float().to(y.device)


def mse_per_sample(
    z: torch.Tensor, raw: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """w_i * mean_e (D_i - y_i)^2, D = c_skip*z + c_out*F, per sample (N,) float32."""
    d = denoise(z.float(), raw.float(), sigma.float())
    return w.float() * (d - y.float()).pow(2).flatten(1).mean(dim=1)


def ce_per_sample(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w_i * CE(logits_i, label_i) per row (N,) float32; label -100 gives 0."""
    return w.float() * F.cross_entropy(logits.float(), labels, reduction="none")
