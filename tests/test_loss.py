import pytest
import torch
import torch.nn.functional as F

from dbcore.method.edm import loss_weight
from dbcore.method.loss import denoise, sample_weights, weighted_ce, weighted_mse


def test_weights_modes():
    s = torch.tensor([0.01, 0.5, 40.0])
    w = loss_weight(s)
    assert torch.equal(sample_weights(s, "none"), torch.ones(3))
    assert torch.allclose(sample_weights(s, "edm"), w)
    assert torch.allclose(sample_weights(s, "normalized").mean(), torch.tensor(1.0))
    assert torch.allclose(sample_weights(s, "clamped", clamp_max=100.0), w.clamp(max=100.0))
    with pytest.raises(ValueError):
        sample_weights(s, "bogus")


def test_weighted_ce_is_per_sample():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    w = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    ce = F.cross_entropy(logits, labels, reduction="none")
    got = weighted_ce(logits, labels, w)
    assert torch.allclose(got, (w * ce).mean())
    assert not torch.allclose(got, w.mean() * ce.mean(), rtol=1e-3)  # the broadcast bug


def test_weighted_mse_is_per_sample():
    torch.manual_seed(0)
    d, y = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    w = torch.tensor([1.0, 5.0, 50.0])
    per = ((d - y) ** 2).flatten(1).mean(1)
    assert torch.allclose(weighted_mse(d, y, w), (w * per).mean())
    assert not torch.allclose(weighted_mse(d, y, w), w.mean() * per.mean(), rtol=1e-3)


def test_denoise_broadcasts_sigma_per_sample():
    z, raw = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    s = torch.tensor([0.1, 10.0])
    d = denoise(z, raw, s)
    for i in range(2):
        assert torch.allclose(d[i], denoise(z[i : i + 1], raw[i : i + 1], s[i : i + 1])[0])
