"""EDM constants, preconditioning and loss weight (METHOD.md section 2; Karras et al. 2022).

The single source of truth for every EDM formula in the package. `s` is sigma, `sd` is sigma_data.
Works on floats and on tensors alike; broadcast a per-sample sigma as `s[:, None, None]` yourself.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def loss_weight(s: torch.Tensor, sd: float = SIGMA_DATA) -> torch.Tensor:
    """w(s) = (s^2 + sd^2) / (s*sd)^2: one weight per sample, never broadcast against a mean."""
    return (s * s + sd * sd) / (s * sd) ** 2

