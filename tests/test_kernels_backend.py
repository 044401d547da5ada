"""Backend switch and the torch path of dbcore.kernels (CPU)."""

from __future__ import annotations

import pytest
import torch

import dbcore.kernels as K
from dbcore.kernels import reference
from dbcore.kernels._cupy import cupy_available
from dbcore.method.loss import denoise, sample_weights, weighted_ce, weighted_mse
from dbcore.method.partition import block_range


def test_resolve_backend():
    assert K.resolve_backend("torch") == "torch"
    assert K.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        K.resolve_backend("triton")
    if not (torch.cuda.is_available() and cupy_available()):
        with pytest.raises(K.BackendUnavailable, match="needs"):
            K.resolve_backend("cupy", "cpu")
    if not cupy_available():
        with pytest.raises(K.BackendUnavailable, match="CuPy"):
            K.block_loss_ce(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), torch.ones(2),
                            backend="cupy")


def test_package_imports_without_cupy():
    import sys

    import dbcore.kernels.functions  # noqa: F401

    if not cupy_available():
        assert "cupy" not in sys.modules


def test_noise_torch_path_matches_rng():
    from dbcore.method import rng

    lo, hi = block_range(1, 3)
    y = torch.randn(5, 2, 8)
    sample = torch.tensor([3, 1, 4, 1, 5])
    z, cz, sigma = K.noise_and_input(y, sample, 11, 1, 2, lo, hi)
    eps = rng.gaussian(sample, 16, 11, 1, 2).view(5, 2, 8)
    s64 = reference.sigma_of_samples(sample, 11, 1, 2, lo, hi, "lognormal")
    torch.testing.assert_close(z, (y.double() + s64.view(-1, 1, 1) * eps).float())
    torch.testing.assert_close(cz, z / torch.sqrt(sigma**2 + 0.25).view(-1, 1, 1))
    assert sigma.dtype == torch.float32 and ((sigma >= lo * 0.999) & (sigma <= hi * 1.001)).all()
    torch.testing.assert_close(z[1] - y[1], z[3] - y[3])  # same sample index, same noise


def test_losses_torch_path_match_loss_module():
    g = torch.Generator().manual_seed(0)
    z, raw, y = (torch.randn(6, 4, 5, generator=g) for _ in range(3))
    sigma = torch.rand(6, generator=g) * 3 + 0.01
    w = sample_weights(sigma, "edm")
    got = K.block_loss_mse(z, raw, y, sigma, w)
    torch.testing.assert_close(got, weighted_mse(denoise(z, raw, sigma), y, w))
    assert K.block_loss_mse(z, raw, y, sigma, w, reduction="none").shape == (6,)
    logits = torch.randn(6, 11, generator=g)
    labels = torch.randint(0, 11, (6,), generator=g)
    torch.testing.assert_close(K.block_loss_ce(logits, labels, w), weighted_ce(logits, labels, w))
    with pytest.raises(ValueError, match="constant"):
        K.block_loss_mse(z, raw, y, sigma.requires_grad_(True), w)
