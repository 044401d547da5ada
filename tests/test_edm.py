import math

import pytest
import torch

from dbcore.method.edm import SIGMA_DATA, loss_weight, precond
from dbcore.method.loss import denoise

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)


def test_constants():
    from dbcore.method import edm

    assert (edm.P_MEAN, edm.P_STD, edm.SIGMA_MIN, edm.SIGMA_MAX, edm.SIGMA_DATA) == (
        -1.2, 1.2, 0.002, 80.0, 0.5,
    )


def test_precond_identities():
    p = precond(SIGMAS)
    sd2 = SIGMA_DATA**2
    # c_skip + c_out^2/sd^2 = 1 and c_in^2 (s^2 + sd^2) = 1
    assert torch.allclose(p.c_skip + p.c_out**2 / sd2, torch.ones_like(SIGMAS))
    assert torch.allclose(p.c_in**2 * (SIGMAS**2 + sd2), torch.ones_like(SIGMAS))
    assert torch.allclose(p.c_out, SIGMAS * SIGMA_DATA * p.c_in)
    assert torch.allclose(p.c_noise, torch.log(SIGMAS) / 4)


def test_denoiser_limits():
    z = torch.randn(2, 8, dtype=torch.float64)
    raw = torch.randn(2, 8, dtype=torch.float64)
    near0 = denoise(z, raw, torch.full((2,), 1e-8, dtype=torch.float64))
    assert torch.allclose(near0, z, atol=1e-7)  # D(z, s -> 0) = z
    far = denoise(z, raw, torch.full((2,), 1e8, dtype=torch.float64))
    assert torch.allclose(far, SIGMA_DATA * raw, atol=1e-6)  # D(z, s -> inf) = sd * F


def test_loss_weight():
    w = loss_weight(SIGMAS)
    assert torch.allclose(w, 1 / SIGMAS**2 + 4)
    assert float(loss_weight(torch.tensor(80.0))) == pytest.approx(4.0 + 1 / 6400)
    assert float(loss_weight(torch.tensor(0.002))) == pytest.approx(250_004.0)
    assert math.isclose(float(loss_weight(torch.tensor(0.5))), 8.0)
