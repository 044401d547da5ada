"""The kernels' per-element math, built for the host with g++, against the PyTorch reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dbcore.kernels import reference
from dbcore.kernels.host import HostCompilerMissing, host_library
from dbcore.method import rng
from dbcore.method.edm import P_MEAN, P_STD, SIGMA_DATA
from dbcore.method.partition import block_range, sample_sigma


@pytest.fixture(scope="module")
def lib():
    try:
        return host_library()
    except HostCompilerMissing as exc:
        pytest.skip(f"no host build of the kernels: {exc}")


# Random123 known-answer vectors for philox4x32-10: counter, key, output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("ctr", "key", "out"), KAT)
def test_philox_known_answers(lib, ctr, key, out):
    seed = key[0] | (key[1] << 32)
    assert tuple(lib.philox(np.array([ctr]), seed)[0]) == out
    ref = rng.philox4x32(tuple(torch.tensor([c]) for c in ctr), seed)
    assert tuple(int(r) for r in ref) == out


def test_philox_matches_reference_on_random_counters(lib):
    g = np.random.default_rng(0)
    ctr = g.integers(0, 2**32, size=(4096, 4), dtype=np.uint64).astype(np.uint32)
    for seed in (0, 12345, 2**63 + 977):
        ref = rng.philox4x32(tuple(torch.from_numpy(ctr[:, i].astype(np.int64)) for i in range(4)), seed)
        np.testing.assert_array_equal(lib.philox(ctr, seed), torch.stack(ref, 1).numpy())


def test_gaussians_match_reference(lib):
    sample = torch.tensor([0, 1, 7, 2**31, 2**32 - 1] + list(range(100, 1100)), dtype=torch.int64)
    e = 37  # a partial last group of 4
    got = lib.gaussian(sample.numpy(), e, seed=99, block=2, draw=5)
    ref = rng.gaussian(sample, e, seed=99, block=2, draw=5).numpy()
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)


def test_ndtri_matches_torch(lib):
    p = np.concatenate([
        np.geomspace(1e-300, 0.5, 2000), 1 - np.geomspace(1e-16, 0.5, 2000),
        np.linspace(0.001, 0.999, 2001),
    ])
    ref = torch.special.ndtri(torch.from_numpy(p)).numpy()
    np.testing.assert_allclose(lib.ndtri(p), ref, rtol=1e-13, atol=1e-15)


def test_bf16_rounding_matches_torch(lib):
    x = np.concatenate([
        np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 100,
        np.array([0.0, -0.0, np.inf, -np.inf, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38], np.float32),
    ])
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(lib.bf16_bits(x), ref)
    assert np.isnan(torch.from_numpy(lib.bf16_bits(np.array([np.nan], np.float32)).view(np.int16))
                    .view(torch.bfloat16).float().numpy()).all()


def _bf16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _from_bf16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()


@pytest.mark.parametrize("dist", ["lognormal", "loguniform"])
@pytest.mark.parametrize("block", [0, 2, 3])
def test_noise_matches_reference(lib, dist, block):
    lo, hi = block_range(block, 4, 0.05)
    code, a, b = reference.dist_params(dist, lo, hi)
    sample = torch.arange(1000, 1064, dtype=torch.int64)
    y = torch.randn(64, 3, 7, generator=torch.Generator().manual_seed(block))
    z_ref, cz_ref, s_ref = reference.noise_and_input(y, sample, 42, block, 3, lo, hi, dist)
    args = (sample.numpy(), 42, block, 3, code, a, b, P_MEAN, P_STD, SIGMA_DATA)
    z, cz, s = lib.noise(y.reshape(64, -1).numpy(), *args)
    np.testing.assert_allclose(s, s_ref.numpy(), rtol=1e-6)
    assert ((s >= lo * (1 - 1e-6)) & (s <= hi * (1 + 1e-6))).all()
    tol = 2e-6 * max(1.0, hi)
    np.testing.assert_allclose(z, z_ref.reshape(64, -1).numpy(), rtol=1e-5, atol=tol)
    np.testing.assert_allclose(cz, cz_ref.reshape(64, -1).numpy(), rtol=1e-5, atol=2e-6)
    # bfloat16 targets: the same math, one rounding of z (and of c_in z) to bfloat16
    zb, czb, sb = lib.noise(_bf16(y.reshape(64, -1)), *args)
    yb = y.to(torch.bfloat16)
    zb_ref, czb_ref, _ = reference.noise_and_input(yb, sample, 42, block, 3, lo, hi, dist)
    np.testing.assert_array_equal(sb, s)
    torch.testing.assert_close(_from_bf16(zb), zb_ref.reshape(64, -1).float(), rtol=8e-3, atol=tol)
    torch.testing.assert_close(_from_bf16(czb), czb_ref.reshape(64, -1).float(), rtol=8e-3, atol=1e-5)


def test_noise_poisons_sample_outside_32_bits(lib):
    z, _, s = lib.noise(np.zeros((2, 4), np.float32), np.array([-1, 2**32]), 1, 0, 0, 0,
                        0.1, 0.9, P_MEAN, P_STD, SIGMA_DATA)
    assert np.isnan(s).all() and np.isnan(z).all()


def _mse_case(n: int, e: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    z, f, y = (torch.randn(n, e, generator=g) for _ in range(3))
    u = torch.rand(n, generator=g, dtype=torch.float64)
    sigma = sample_sigma(u, 0.002, 80.0).float()
    w = torch.rand(n, generator=g) * 10
    return z, f, y, sigma, w


def test_mse_forward_and_backward_match_autograd(lib):
    z, f, y, sigma, w = _mse_case(9, 1000, 0)
    zr, fr, yr = (t.clone().requires_grad_(True) for t in (z, f, y))
    ref = reference.mse_per_sample(zr, fr, yr, sigma, w)
    g = torch.rand(9, dtype=torch.float32)
    ref.backward(g)
    mse, loss = lib.mse_forward(z, f, y, sigma, w, SIGMA_DATA)
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(mse * w.numpy(), loss, rtol=1e-6)
    gf, gz, gy = lib.mse_backward(z, f, y, sigma, w, g, SIGMA_DATA)
    for got, want in ((gf, fr.grad), (gz, zr.grad), (gy, yr.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-9)


def _ce_check(lib, logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> None:
    x = logits.clone().requires_grad_(True)
    ref = reference.ce_per_sample(x, labels, w)
    g = torch.full((len(labels),), 1.0 / len(labels))  # the "mean" reduction
    ref.backward(g)
    loss, stats = lib.ce_forward(logits, labels, w)
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    grad = lib.ce_backward(logits, labels, stats, w, g)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-4, atol=1e-8)


def test_ce_matches_autograd_small_vocab(lib):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(33, 10, generator=gen) * 4
    logits[1, :5] = -math.inf  # masked entries
    logits[2] += 1e4  # large offsets: the online max keeps exp in range
    labels = torch.randint(0, 10, (33,), generator=gen)
    labels[1] = 7
    labels[3] = -100  # ignored row
    _ce_check(lib, logits, labels, torch.rand(33, generator=gen) * 5)


def test_ce_matches_autograd_50k_vocab(lib):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 50257, generator=gen) * 3
    labels = torch.randint(0, 50257, (4,), generator=gen)
    _ce_check(lib, logits, labels, torch.rand(4, generator=gen) * 5)


def test_ce_bad_label_is_nan(lib):
    loss, _ = lib.ce_forward(torch.zeros(2, 5), torch.tensor([5, -2]), torch.ones(2))
    assert np.isnan(loss).all()
