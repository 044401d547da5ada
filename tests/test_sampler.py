import gc
import weakref

import pytest
import torch
from torch import nn

from dbcore.edm import SIGMA_MAX, SIGMA_MIN
from dbcore.partition import euler_schedule
from dbcore.recipes.vit import ViTBlock, make_target_embedding, vit_tiny
from dbcore.sampler import chain_states, initial_noise, sample_labels


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Loader:
    """Builds block b on demand, counts loads and checks the previous block was released."""

    def __init__(self, make):
        self.make, self.loaded, self.refs = make, [], []

    def __call__(self, b):
        gc.collect()
        assert all(r() is None for r in self.refs), "an earlier block is still alive"
        block = self.make(b)
        self.loaded.append(b)
        self.refs.append(weakref.ref(block))
        return block


class Oracle(nn.Module):
    """Knows the label (encoded as the image's first pixel): D_hat = E[label] exactly."""

    def __init__(self, emb):
        super().__init__()
        self.register_buffer("target_embedding", emb)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, z, sigma):
        labels = x[:, 0, 0, 0].long()
        logits = torch.full((len(x), len(self.target_embedding)), -1e4)
        logits[torch.arange(len(x)), labels] = 1e4
        return None, logits


CFG = vit_tiny(num_blocks=2)
EMB = make_target_embedding(CFG.num_classes, CFG.dim, seed=0)


def _vit_loader():
    def make(b):
        torch.manual_seed(b)
        return ViTBlock(CFG, b, EMB)

    return Loader(make)


@pytest.mark.parametrize("num_steps", [2, 5])
def test_sampler_loads_each_block_once(num_steps):
    x = torch.rand(7, 1, 8, 8)
    loader = _vit_loader()
    pred, logits = sample_labels(loader, x, CFG, num_steps=num_steps, batch_size=3, seed=1)
    assert loader.loaded == [0, 1]
    assert pred.shape == (7,) and logits.shape == (7, 10) and torch.equal(pred, logits.argmax(1))
    again = sample_labels(_vit_loader(), x, CFG, num_steps=num_steps, batch_size=5, seed=1)[1]
    assert torch.allclose(logits, again, atol=1e-5)  # batching does not change the result


def test_chain_states_start_is_initial_noise():
    x = torch.rand(4, 1, 8, 8)
    loader = _vit_loader()
    z, sigma = chain_states(loader, x, CFG, num_steps=2, upto_block=0, seed=3)
    assert loader.loaded == []
    assert torch.equal(z, initial_noise(torch.arange(4), CFG.dim, CFG.num_blocks, seed=3))
    assert torch.equal(sigma, torch.full((4,), SIGMA_MAX))
    assert float(z.std()) == pytest.approx(SIGMA_MAX, rel=0.2)


def test_chain_states_hand_over():
    x = torch.rand(4, 1, 8, 8)
    loader = _vit_loader()
    _, sigma = chain_states(loader, x, CFG, num_steps=5, upto_block=1)
    assert loader.loaded == [0]
    first_of_block1 = next(s.sigma for s in euler_schedule(2, 5) if s.block == 1)
    assert torch.allclose(sigma, torch.full((4,), first_of_block1))
    with pytest.raises(ValueError):
        chain_states(loader, x, CFG, num_steps=5, upto_block=3)


@pytest.mark.parametrize("num_steps", [2, 3, 50])
def test_euler_with_exact_denoiser(num_steps):
    # D = y exactly: each step scales z - y by s_next / s, so the chain ends at
    # y + (sigma_min / sigma_max) (z0 - y), whatever the number of steps.
    labels = torch.tensor([0, 4, 9, 2])
    x = torch.zeros(4, 1, 8, 8)
    x[:, 0, 0, 0] = labels.float()
    loader = Loader(lambda b: Oracle(EMB))
    pred, _ = sample_labels(loader, x, CFG, num_steps=num_steps)
    assert torch.equal(pred, labels) and loader.loaded == [0, 1]
    z, sigma = chain_states(Loader(lambda b: Oracle(EMB)), x, CFG, num_steps, upto_block=2)
    z0, y = initial_noise(torch.arange(4), CFG.dim, 2, seed=0), EMB[labels]
    assert torch.allclose(z, y + SIGMA_MIN / SIGMA_MAX * (z0 - y), atol=1e-5)
    assert torch.equal(sigma, torch.full((4,), SIGMA_MIN))


def test_sample_index_keys_the_noise():
    z_a = initial_noise(torch.tensor([5, 6]), 16, 2, seed=0)
    z_b = initial_noise(torch.tensor([6]), 16, 2, seed=0)
    assert torch.equal(z_a[1], z_b[0])


class FixedLogits(nn.Module):
    """Block b answers the same logits for every sample, whatever z is."""

    def __init__(self, emb, logits):
        super().__init__()
        self.register_buffer("target_embedding", emb)
        self.register_buffer("logits", logits)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, z, sigma):
        return None, self.logits.expand(len(x), -1)


def test_product_decode_sums_every_steps_log_softmax():
    v = CFG.num_classes
    per_block = [torch.zeros(v), torch.zeros(v)]
    per_block[0][3], per_block[0][5] = 4.0, 3.0  # block 0 prefers class 3 ...
    per_block[1][5], per_block[1][3] = 2.0, 1.5  # ... block 1, the last, class 5 by a little less
    x = torch.zeros(4, CFG.channels, CFG.image_size, CFG.image_size)

    def load(b):
        return FixedLogits(EMB, per_block[b])

    last, _ = sample_labels(load, x, CFG, num_steps=2)
    prod, scores = sample_labels(load, x, CFG, num_steps=2, decode="product")
    expect = sum(torch.log_softmax(lg, -1) for lg in per_block)
    assert last.tolist() == [5] * 4 and prod.tolist() == [3] * 4
    assert torch.allclose(scores, expect.expand(4, -1))
    with pytest.raises(ValueError, match="decode"):
        sample_labels(load, x, CFG, decode="vote")
