import pytest
import torch

from dbcore.method.rng import (
    MIX_GROUP,
    SIGMA_GROUP,
    check_request,
    gaussian,
    philox4x32,
    uniform_for_sigma,
    uniforms,
    uniforms_of,
)


def _philox(ctr, key):
    counter = tuple(torch.tensor([c], dtype=torch.int64) for c in ctr)
    seed = key[0] | (key[1] << 32)
    return [int(v) for v in philox4x32(counter, seed)]


@pytest.mark.parametrize(
    ("ctr", "key", "expected"),
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        (
            (0xFFFFFFFF,) * 4,
            (0xFFFFFFFF, 0xFFFFFFFF),
            (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
        ),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    assert _philox(ctr, key) == list(expected)


def test_gaussian_moments_and_determinism():
    sample = torch.arange(512)
    n = gaussian(sample, 130, seed=7, block=1, draw=0)  # (512, 130), odd length keeps a prefix
    assert n.shape == (512, 130) and n.dtype == torch.float64
    assert abs(float(n.mean())) < 0.02
    assert float(n.std()) == pytest.approx(1.0, abs=0.02)
    assert float((n**4).mean()) == pytest.approx(3.0, abs=0.15)
    assert torch.equal(n, gaussian(sample, 130, seed=7, block=1, draw=0))
    # keyed by sample index: a sample's noise does not depend on the batch it is drawn in
    assert torch.equal(n[100:101], gaussian(torch.tensor([100]), 130, seed=7, block=1, draw=0))
    assert torch.equal(n[:, :64], gaussian(sample, 64, seed=7, block=1, draw=0))
    assert not torch.equal(n, gaussian(sample, 130, seed=7, block=2, draw=0))


def test_uniform_for_sigma():
    u = uniform_for_sigma(torch.arange(10_000), seed=3, block=0, draw=1)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    assert not torch.equal(u, uniform_for_sigma(torch.arange(10_000), seed=3, block=0, draw=2))


def test_sample_index_range():
    with pytest.raises(ValueError):
        uniform_for_sigma(torch.tensor([2**32]), seed=0, block=0, draw=0)
    with pytest.raises(ValueError):
        uniforms_of(torch.tensor([2**32]), 3, seed=0, block=0, draw=0)


def test_uniforms_of_layout():
    sample = torch.tensor([0, 1, 5, 99, 2**32 - 1])
    seed, block, draw = 2**40 + 9, 3, 5
    u = uniforms_of(sample, 11, seed, block, draw)
    assert u.shape == (5, 11) and u.dtype == torch.float64
    assert float(u.min()) > 0 and float(u.max()) < 1
    # uniform 0 is the sigma uniform, bit for bit
    assert torch.equal(u[:, 0], uniform_for_sigma(sample, seed, block, draw))
    # uniform k: group SIGMA_GROUP - k // 4, output k % 4; 4..6 are target mixing's MIX_GROUP 0..2
    assert torch.equal(u[:, 0:4], uniforms(sample, seed, block, draw, SIGMA_GROUP))
    assert torch.equal(u[:, 4:7], uniforms(sample, seed, block, draw, MIX_GROUP)[:, :3])
    assert torch.equal(u[:, 8:11], uniforms(sample, seed, block, draw, SIGMA_GROUP - 2)[:, :3])
    # a shorter request is a prefix; keyed by sample, not by batch
    assert torch.equal(u[:, :5], uniforms_of(sample, 5, seed, block, draw))
    assert torch.equal(u[2:3], uniforms_of(sample[2:3], 11, seed, block, draw))
    assert uniforms_of(sample, 0, seed, block, draw).shape == (5, 0)
    assert not torch.equal(u, uniforms_of(sample, 11, seed, block, draw + 1))


def test_uniforms_of_moments():
    u = uniforms_of(torch.arange(4096), 7, seed=1, block=0, draw=0)
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(u.var()) == pytest.approx(1 / 12, abs=0.005)
    c = torch.corrcoef(u.T)  # columns independent
    assert float((c - torch.eye(7)).abs().max()) < 0.06


def test_noise_request_limits():
    check_request(10**6, 10**6)
    check_request(4 * (2**31 - 1) + 3, 4 * (2**31 - 1) + 3)  # 2^31 groups each: they fill the counter
    with pytest.raises(ValueError, match="would meet"):
        check_request(4 * 2**31, 4 * (2**31 - 1))
    with pytest.raises(ValueError, match="would meet"):
        uniforms_of(torch.arange(2), 2**34 + 4, seed=0, block=0, draw=0)
    with pytest.raises(ValueError):
        check_request(-1, 0)
