import gc
import weakref

import pytest
import torch
from torch import nn

from dbcore import config as config_mod
from dbcore.method.edm import SIGMA_MAX, SIGMA_MIN
from dbcore.method.partition import euler_schedule
from dbcore.method.sampler import initial_noise, level_before, run_chain
from dbcore.models.layers import make_target_embedding
from dbcore.recipes import for_config
from dbcore.recipes.vit import ViTBlock

pytestmark = pytest.mark.usefixtures("one_thread")


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
        labels = (x[:, 0, 0, 0] * 255).round().long()  # uint8 pixel -> [0, 1] -> label
        logits = torch.full((len(x), len(self.target_embedding)), -1e4)
        logits[torch.arange(len(x)), labels] = 1e4
        return None, logits


RUN = config_mod.from_dict({"model": {"recipe": "vit", "image_size": 8, "patch_size": 2, "dim": 64,
                                      "depth": 4, "heads": 4, "num_blocks": 2}}, "test.toml")
RECIPE = for_config(RUN)
CFG = RUN.model
EMB = make_target_embedding(CFG.num_classes, CFG.dim, seed=0)


def _vit_loader():
    def make(b):
        torch.manual_seed(b)
        return ViTBlock(CFG, b, EMB)

    return Loader(make)


def _images(n, labels=None):
    x = torch.randint(0, 256, (n, 8, 8, 1), dtype=torch.uint8)
    if labels is not None:
        x[:, 0, 0, 0] = labels.to(torch.uint8)
    return x


def _chain(loader, images, num_steps, upto=None, batch_size=256, seed=0, observe=None):
    z0 = initial_noise(torch.arange(len(images)), (CFG.dim,), CFG.num_blocks, seed)
    return run_chain(RECIPE, loader, {"images": images}, z0, CFG.num_blocks, num_steps, upto_block=upto,
                     batch_size=batch_size, observe=observe)


@pytest.mark.parametrize("num_steps", [2, 5])
def test_sampler_loads_each_block_once(num_steps):
    x = _images(7)
    loader = _vit_loader()
    z = _chain(loader, x, num_steps, batch_size=3, seed=1)
    assert loader.loaded == [0, 1] and z.shape == (7, CFG.dim)
    again = _chain(_vit_loader(), x, num_steps, batch_size=5, seed=1)
    assert torch.allclose(z, again, atol=1e-5)  # batching does not change the result


def test_chain_start_is_initial_noise():
    x = _images(4)
    loader = _vit_loader()
    z = _chain(loader, x, 2, upto=0, seed=3)
    assert loader.loaded == []
    assert torch.equal(z, initial_noise(torch.arange(4), (CFG.dim,), CFG.num_blocks, seed=3))
    assert level_before(2, 2, 0) == SIGMA_MAX
    assert float(z.std()) == pytest.approx(SIGMA_MAX, rel=0.2)


def test_chain_hands_over_at_the_first_level_of_the_next_block():
    loader = _vit_loader()
    _chain(loader, _images(4), 5, upto=1)
    assert loader.loaded == [0]
    assert level_before(2, 5, 1) == next(s.sigma for s in euler_schedule(2, 5) if s.block == 1)
    assert level_before(2, 5, 2) == SIGMA_MIN


@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("num_steps", [2, 3, 50])
def test_euler_and_heun_with_exact_denoiser(num_steps, heun):
    # D = y exactly: each step scales z - y by s_next / s (Heun's slope at s_next is the same), so
    # the chain ends at y + (sigma_min / sigma_max) (z0 - y), whatever the number of steps.
    labels = torch.tensor([0, 4, 9, 2])
    loader = Loader(lambda b: Oracle(EMB))
    z0 = initial_noise(torch.arange(4), (CFG.dim,), 2, seed=0)
    z = run_chain(RECIPE, loader, {"images": _images(4, labels)}, z0, 2, num_steps, heun=heun)
    assert loader.loaded == [0, 1]
    y = EMB[labels]
    # Heun's slope at s_next divides a float32 difference of size ~ulp(80) by s_next: looser there
    assert torch.allclose(z, y + SIGMA_MIN / SIGMA_MAX * (z0 - y), atol=5e-3 if heun else 1e-5)


def test_sample_index_keys_the_noise():
    z_a = initial_noise(torch.tensor([5, 6]), (16,), 2, seed=0)
    z_b = initial_noise(torch.tensor([6]), (16,), 2, seed=0)
    assert torch.equal(z_a[1], z_b[0])
    assert initial_noise(torch.tensor([1]), (2, 4, 4), 2, seed=0).shape == (1, 2, 4, 4)


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

    def load(b):
        return FixedLogits(EMB, per_block[b])

    from dbcore.data.sources import load_source
    from dbcore.method.options import Options

    valid = load_source("digits:valid")
    last = RECIPE.evaluate(load, None, valid, Options(steps=2, decode="last"))
    prod = RECIPE.evaluate(load, None, valid, Options(steps=2, decode="product"))
    labels = torch.from_numpy(valid.labels)
    assert last["accuracy"] == pytest.approx(float((labels == 5).float().mean()))
    assert prod["accuracy"] == pytest.approx(float((labels == 3).float().mean()))
    assert [b["accuracy_last"] for b in prod["per_block"]] == pytest.approx(
        [float((labels == 3).float().mean()), float((labels == 5).float().mean())], abs=1e-6)
    with pytest.raises(ValueError, match="decode"):
        RECIPE.evaluate(load, None, valid, Options(decode="vote"))
