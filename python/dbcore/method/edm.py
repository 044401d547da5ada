"""EDM constants, preconditioning and loss weight (METHOD.md section 2; Karras et al. 2022).

The single source of truth for every EDM formula in the package. `s` is sigma, `sd` is sigma_data.
Works on floats and on tensors alike; broadcast a per-sample sigma as `s[:, None, None]` yourself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

P_MEAN = -1.2
P_STD = 1.2
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class Precond:
    """c_skip, c_out, c_in, c_noise of `D(z, s) = c_skip*z + c_out*F(c_in*z, c_noise)`."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def precond(s: torch.Tensor, sd: float = SIGMA_DATA) -> Precond:
    s2, sd2 = s * s, sd * sd
    return Precond(
        c_skip=sd2 / (s2 + sd2),
        c_out=s * sd / torch.sqrt(s2 + sd2),
        c_in=1.0 / torch.sqrt(s2 + sd2),
        c_noise=torch.log(s) / 4.0,
    )


def denoise(z: torch.Tensor, raw: torch.Tensor, sigma: torch.Tensor, sd: float = SIGMA_DATA) -> torch.Tensor:
    """D = c_skip*z + c_out*F with sigma (N,) broadcast over the trailing dims of z (N, ...)."""
    p = precond(sigma.view(-1, *([1] * (z.dim() - 1))), sd)
    return p.c_skip * z + p.c_out * raw


def add_noise(y: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = y + sigma * eps (METHOD.md 2): y, eps (N, ...), sigma (N,); summed in float64, cast to y's
    dtype. The one place the noisy target is formed (cache, online stream, kernel reference)."""
    s = sigma.to(torch.float64).view(-1, *([1] * (y.dim() - 1)))
    return (y.double() + s * eps.to(torch.float64).view(y.shape)).to(y.dtype)


def loss_weight(s: torch.Tensor, sd: float = SIGMA_DATA) -> torch.Tensor:
    """w(s) = (s^2 + sd^2) / (s*sd)^2: one weight per sample, never broadcast against a mean."""
    return (s * s + sd * sd) / (s * sd) ** 2



class EDMPrecond(torch.nn.Module):
    """Wraps a raw network F into the denoiser `D(z, s) = c_skip z + c_out F(c_in z, c_noise, *cond)`.

    The backbone is called as `backbone(c_in * z, c_noise, *cond)` and returns F shaped like z;
    `forward` returns D. sigma is (N,) (or a scalar) and is broadcast over z's trailing dims here,
    once, for every recipe (METHOD.md 2 and 10: never a (N,) tensor against (N, T, d)).
    `network`, where given, replaces the backbone's forward by another of its entry points with
    the same contract (a decoding path over cached rows, for example).
    """

    def __init__(self, backbone: torch.nn.Module, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.backbone, self.sigma_data = backbone, sigma_data

    def raw(self, z: torch.Tensor, sigma: torch.Tensor, *cond: Any, network: Callable | None = None
            ) -> torch.Tensor:
        """F(c_in z, c_noise, *cond), shaped like z: what a fused loss kernel takes beside z."""
        sigma = self._per_sample(z, sigma)
        p = precond(sigma.view(-1, *([1] * (z.dim() - 1))), self.sigma_data)  # each (N, 1, ...)
        return (network or self.backbone)(p.c_in * z, p.c_noise.reshape(-1), *cond)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, *cond: Any, network: Callable | None = None
                ) -> torch.Tensor:
        """z (N, ...), sigma (N,) or scalar -> D (N, ...)."""
        sigma = self._per_sample(z, sigma)
        return denoise(z, self.raw(z, sigma, *cond, network=network).to(z.dtype), sigma, self.sigma_data)

    @staticmethod
    def _per_sample(z: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=z.dtype, device=z.device).reshape(-1).expand(z.shape[0])
