"""CuPy kernels against the torch reference on a CUDA device: values and gradients."""

from __future__ import annotations

import pytest
import torch

import dbcore.kernels as K
from dbcore.kernels._cupy import cupy_available
from dbcore.method.loss import sample_weights
from dbcore.method.partition import block_range

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not cupy_available(), reason="CuPy not installed (pip install 'dbcore[cuda]')"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dist", ["lognormal", "loguniform"])
@pytest.mark.parametrize("shape", [(64, 3, 7), (32, 16, 64)])  # scalar and vector paths
def test_noise_matches_torch(dtype, dist, shape):
    lo, hi = block_range(0, 4)
    y = torch.randn(shape, device="cuda").to(dtype)
    sample = torch.arange(500, 500 + shape[0], device="cuda")
    got = K.noise_and_input(y, sample, 5, 0, 1, lo, hi, dist, backend="cupy")
    ref = K.noise_and_input(y, sample, 5, 0, 1, lo, hi, dist, backend="torch")
    tol = dict(rtol=1e-5, atol=2e-6 * hi) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[0].float(), ref[0].float(), **tol)
    torch.testing.assert_close(got[1].float(), ref[1].float(), **tol)


def test_noise_grad_to_y():
    y = torch.randn(8, 12, device="cuda", requires_grad=True)
    z, cz, sigma = K.noise_and_input(y, torch.arange(8, device="cuda"), 1, 0, 0, 0.1, 1.0,
                                     backend="cupy")
    (z.sum() + cz.sum()).backward()
    torch.testing.assert_close(y.grad, (1 + torch.rsqrt(sigma**2 + 0.25))[:, None].expand(8, 12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e", [5, 4096, 300_000])
def test_mse_matches_torch(dtype, e):
    n = 6
    z, raw, y = (torch.randn(n, e, device="cuda").to(dtype).requires_grad_(True) for _ in range(3))
    sigma = torch.rand(n, device="cuda") * 5 + 0.002
    w = sample_weights(sigma, "edm").requires_grad_(True)
    outs = []
    for backend in ("cupy", "torch"):
        for t in (z, raw, y, w):
            t.grad = None
        loss = K.block_loss_mse(z, raw, y, sigma, w, backend=backend)
        loss.backward()
        outs.append([loss.detach()] + [t.grad.clone() for t in (z, raw, y, w)])
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, ref in zip(*outs, strict=True):
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "v"), [(37, 10), (300, 32000), (8, 50257)])
def test_ce_matches_torch(dtype, n, v):
    logits = (torch.randn(n, v, device="cuda") * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[0] = -100
    w = (torch.rand(n, device="cuda") * 5).requires_grad_(True)
    outs = []
    for backend in ("cupy", "torch"):
        logits.grad = w.grad = None
        loss = K.block_loss_ce(logits, labels, w, backend=backend)
        loss.backward()
        outs.append((loss.detach(), logits.grad.clone(), w.grad.clone()))
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, ref in zip(*outs, strict=True):
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=1e-6)


def test_runs_on_a_side_stream():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.randn(64, 1000, device="cuda")
        labels = torch.randint(0, 1000, (64,), device="cuda")
        got = K.block_loss_ce(x, labels, torch.ones(64, device="cuda"), backend="cupy")
        ref = K.block_loss_ce(x, labels, torch.ones(64, device="cuda"), backend="torch")
    s.synchronize()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
