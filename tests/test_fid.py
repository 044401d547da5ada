import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dbcore.errors import CheckpointError
from dbcore.metrics import fid
from dbcore.runs import reference

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"


pytestmark = pytest.mark.usefixtures("one_thread")


def _digits():
    d = load_digits()
    images = np.rint(d.images * 255 / 16).astype(np.uint8)  # (1797, 8, 8)
    labels = d.target.astype(np.int64)
    return images[:1500], labels[:1500], images[1500:], labels[1500:]


def _gaussian_stats(rng, dim=6):
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_identical_and_symmetric():
    rng = np.random.default_rng(0)
    mu1, c1 = _gaussian_stats(rng)
    mu2, c2 = _gaussian_stats(rng)
    assert abs(fid.frechet_distance(mu1, c1, mu1, c1)) < 1e-8
    d12, d21 = fid.frechet_distance(mu1, c1, mu2, c2), fid.frechet_distance(mu2, c2, mu1, c1)
    assert d12 > 0 and d12 == pytest.approx(d21, rel=1e-8)


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm of a singular product
def test_frechet_singular_covariance():
    x = np.random.default_rng(1).normal(size=(3, 5))  # 3 samples in 5-D: rank-2 covariance
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    assert np.isfinite(fid.frechet_distance(mu, cov, mu + 1, cov))
    with pytest.raises(ValueError):
        fid.frechet_distance(mu, cov, mu[:3], cov[:3, :3])


def test_frechet_non_finite_sqrtm_retries_with_eps(monkeypatch):
    real_sqrtm, calls = fid.scipy.linalg.sqrtm, []

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", flaky_sqrtm)
    mu, cov = np.zeros(2), np.eye(2)
    assert fid.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(calls[1], (1 + fid.FD_EPS) ** 2 * np.eye(2))


def test_refnet_shapes_and_stats():
    torch.manual_seed(0)
    net = fid.RefNet(1, 28, 10, feature_dim=32).eval()
    x = torch.rand(7, 1, 28, 28) * 2 - 1
    assert net.features(x).shape == (7, 32) and net(x).shape == (7, 10)
    mu, cov = fid.feature_stats(net, x, batch_size=3)
    assert mu.shape == (32,) and cov.shape == (32, 32) and mu.dtype == cov.dtype == np.float64
    assert fid.RefNet(3, 8, 4)(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    acc = fid.class_accuracy(net, x, net(x).argmax(1))
    assert acc == 1.0


def test_images_to_tensor_and_shift():
    img = np.array([[[0, 255], [255, 0]]], dtype=np.uint8)  # (1, 2, 2)
    x = fid.images_to_tensor(img)
    assert x.shape == (1, 1, 2, 2) and x.min() == -1 and x.max() == 1
    assert fid.images_to_tensor(np.zeros((2, 4, 4, 3), np.uint8)).shape == (2, 3, 4, 4)
    y = torch.arange(2 * 25, dtype=torch.float32).reshape(2, 1, 5, 5)
    s = fid.random_shift(y, 1, torch.Generator().manual_seed(0))
    assert s.shape == y.shape
    for i in range(2):  # each output is the input moved by one (dy, dx) in [-1, 1]^2, padded with -1
        vals = set(s[i].flatten().tolist()) - {-1.0}
        assert vals <= set(y[i].flatten().tolist()) and len(vals) >= 16


def test_training_is_repeatable():
    x, y, xv, yv = (a[:300] for a in _digits())
    (n1, a1), (n2, a2) = (fid.train_reference(x, y, xv, yv, seed=3, epochs=1, max_shift=1) for _ in "ab")
    s1, s2 = n1.state_dict(), n2.state_dict()
    assert a1 == a2 and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_cache_round_trip(tmp_path, monkeypatch):
    calls = []

    def make_data():
        calls.append(1)
        return _digits()

    net, meta = reference.reference_classifier("digits-test", make_data, cache_dir=tmp_path, epochs=1)
    assert calls == [1] and meta["epochs"] == 1 and meta["seed"] == 0
    assert meta["train_source_sha256"] == "digits-test" and 0.5 < meta["valid_accuracy"] <= 1
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"refnet-{meta['key']}.json", f"refnet-{meta['key']}.safetensors"]

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(fid, "train_reference", no_training)
    net2, meta2 = reference.reference_classifier("digits-test", make_data, cache_dir=tmp_path, epochs=1)
    assert calls == [1] and meta2 == meta and not net2.training
    s1, s2 = net.state_dict(), net2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)

    st = tmp_path / f"refnet-{meta['key']}.safetensors"
    data = bytearray(st.read_bytes())
    data[-1] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        reference.reference_classifier("digits-test", make_data, cache_dir=tmp_path, epochs=1)


def test_cache_key_and_default_dir(tmp_path, monkeypatch):
    k = fid.cache_key("a", 0, 1, 128, 128)
    assert k == fid.cache_key("a", 0, 1, 128, 128)
    assert len({k, fid.cache_key("b", 0, 1, 128, 128), fid.cache_key("a", 1, 1, 128, 128),
                fid.cache_key("a", 0, 2, 128, 128)}) == 4
    monkeypatch.setenv("DBCORE_CACHE_DIR", str(tmp_path))
    assert reference._default_cache_dir() == tmp_path


@pytest.mark.slow
@pytest.mark.skipif(not MNIST.is_dir(), reason=f"no MNIST at {MNIST}")
def test_mnist_reference_accuracy():
    train, valid = np.load(MNIST / "train.npz"), np.load(MNIST / "valid.npz")
    start = time.perf_counter()
    net, acc = fid.train_reference(train["images"], train["labels"], valid["images"], valid["labels"])
    print(f"MNIST RefNet: valid accuracy {acc:.4f} in {time.perf_counter() - start:.0f} s")
    assert acc >= 0.99
