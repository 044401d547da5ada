"""Augmentation at training time: a random crop of the padded image and a horizontal flip, per
sample, from the counter-based draws, for blocks and baseline alike, and resumed bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dbcore import config as config_mod
from dbcore.data.cache import write_cache
from dbcore.data.sources import load_source
from dbcore.errors import ConfigError
from dbcore.method.augment import augment_images
from dbcore.runs import checkpoint
from dbcore.runs.train import RunError, train_run

pytestmark = pytest.mark.usefixtures("one_thread")

TOML = """
[model]
image_size = 8
channels = 1
patch_size = 4
dim = 32
depth = 2
heads = 2
num_blocks = 2

[train]
steps = 12
batch_size = 256
warmup_steps = 2
checkpoint_every = 5
augment_crop = 2
augment_flip = true
"""


def _images(n: int = 64) -> torch.Tensor:
    return torch.randint(1, 256, (n, 6, 5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_each_row_is_a_crop_of_its_padded_image_flipped_or_not():
    x, idx = _images(), torch.arange(100, 164)
    out = augment_images(x, idx, seed=3, epoch=1, crop=2, flip=True)
    padded = F.pad(x, (0, 0, 2, 2, 2, 2))
    offsets, flips = set(), 0
    for i in range(len(x)):
        found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(1) if f else c)(padded[i, dy:dy + 6, dx:dx + 5]))]
        assert found, i
        offsets.add(found[0][:2])
        flips += found[0][2]
    assert len(offsets) > 10 and 16 < flips < 48  # the draws spread over offsets and flips


def test_draws_are_per_sample_and_epoch_and_reproducible():
    x = _images()
    idx = torch.arange(64)
    a = augment_images(x, idx, 0, 0, 2, True)
    assert torch.equal(a, augment_images(x, idx, 0, 0, 2, True))
    assert not torch.equal(a, augment_images(x, idx, 0, 1, 2, True))  # another epoch
    assert not torch.equal(a, augment_images(x, idx, 1, 0, 2, True))  # another seed
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[perm], augment_images(x[perm], idx[perm], 0, 0, 2, True))  # by sample, not position
    assert torch.equal(augment_images(x, idx, 0, 0, 0, False), x)


def test_a_recipe_without_images_refuses_augmentation():
    with pytest.raises(ConfigError, match=r"augment_crop, augment_flip: recipe 'arlm' has no images"):
        config_mod.from_dict({"model": {"recipe": "arlm"}, "train": {"augment_flip": True}})
    with pytest.raises(ConfigError, match="augment_crop must be >= 0"):
        config_mod.from_dict({"model": {"recipe": "vit"}, "train": {"augment_crop": -1}})


def _weights(run, name):
    return checkpoint.load(run / name, prefix="model.")[0]


def test_augmented_training_resumes_bit_for_bit_and_changes_what_is_learned(tmp_path, interrupted_at_step):
    from dbcore.runs import train as train_mod

    (tmp_path / "a.toml").write_text(TOML)
    cfg = config_mod.load(tmp_path / "a.toml")
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    for e2e in (False, True):
        name = "e2e" if e2e else "block0"
        train_run(cfg, tmp_path / "c.zarr", tmp_path / f"full{e2e}", block=None if e2e else 0, e2e=e2e,
                  progress=False)
        with interrupted_at_step(8):  # after the step-5 checkpoint, in the second epoch
            train_mod.train_run(cfg, tmp_path / "c.zarr", tmp_path / f"crash{e2e}", block=None if e2e else 0,
                                e2e=e2e, progress=False)
        train_mod.train_run(cfg, tmp_path / "c.zarr", tmp_path / f"crash{e2e}", block=None if e2e else 0,
                            e2e=e2e, progress=False)
        a, b = _weights(tmp_path / f"full{e2e}", name), _weights(tmp_path / f"crash{e2e}", name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    plain = config_mod.with_overrides(cfg, train={"augment_crop": 0, "augment_flip": False})
    train_run(plain, tmp_path / "c.zarr", tmp_path / "plain", block=0, progress=False)
    a, b = _weights(tmp_path / "fullFalse", "block0"), _weights(tmp_path / "plain", "block0")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_dit_refuses_cached_noise_of_unaugmented_images(tmp_path):
    cfg = config_mod.from_dict({"model": {"recipe": "dit", "image_size": 8, "channels": 1, "patch_size": 4,
                                          "dim": 32, "depth": 2, "heads": 2, "num_blocks": 2},
                                "train": {"steps": 2, "batch_size": 32, "augment_flip": True}})
    write_cache(cfg, load_source("digits:train"), tmp_path / "n.zarr", noise="cached", draws=1,
                progress=False)
    with pytest.raises(RunError, match="holds cached noised targets of the images as stored"):
        train_run(cfg, tmp_path / "n.zarr", tmp_path / "run", block=0, progress=False)
