"""The DiT recipe end to end on digits: cache -> train -> sample/eval/report, resume, bad input."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dbcore import config as config_mod
from dbcore.cli import main
from dbcore.data import store
from dbcore.data.cache import write_cache
from dbcore.data.sources import load_source
from dbcore.method import layout
from dbcore.method.batch import Noised
from dbcore.method.edm import denoise
from dbcore.method.loss import sample_weights
from dbcore.metrics import fid
from dbcore.recipes import for_config
from dbcore.recipes.dit import images_to_target, target_to_images
from dbcore.runs import checkpoint
from dbcore.runs.train import train_run

TOML = """
[model]
recipe = "dit"
image_size = 8
channels = 1
patch_size = 2
dim = 32
depth = 2
heads = 2
mlp_ratio = 2.0
num_blocks = 2
sample_steps = 4

[train]
steps = 8
batch_size = 32
warmup_steps = 2
checkpoint_every = 3
weight = "edm"
"""


@pytest.fixture(autouse=True)
def small_world(monkeypatch, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("DBCORE_CACHE_DIR", str(tmp_path / "fid_cache"))
    monkeypatch.setattr(fid, "MIN_STEPS", 20)  # a quick reference classifier: its accuracy is not tested here
    monkeypatch.setattr(fid, "MIN_EPOCHS", 1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cfg_path(tmp_path):
    p = tmp_path / "dit.toml"
    p.write_text(TOML)
    return p


@pytest.fixture
def trained(tmp_path, cfg_path):
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "db", progress=False)
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "e2e", e2e=True, progress=False)
    return cfg


def test_targets_round_trip_and_loss_is_weighted_mse_of_d():
    cfg = config_mod.from_dict(config_mod.tomllib.loads(TOML), "t.toml")
    recipe = for_config(cfg)
    images = torch.randint(0, 256, (5, 8, 8, 1), dtype=torch.uint8)
    y = images_to_target(images)
    assert y.shape == (5, 1, 8, 8) and float(y.min()) >= -1 and float(y.max()) <= 1
    assert np.array_equal(target_to_images(y), images.numpy())
    torch.manual_seed(0)
    block = recipe.build_block(0, {})
    for p in block.parameters():  # leave the zero init so that F matters
        torch.nn.init.normal_(p, std=0.05)
    sigma = torch.tensor([0.1, 0.5, 1.0, 5.0, 50.0])
    z = y + sigma[:, None, None, None] * torch.randn_like(y)
    labels = torch.tensor([0, 1, 2, 3, 4])
    keep = torch.tensor([[0.5, 0.9]] * 5, dtype=torch.float64)  # uniform 1 >= class_drop: no drop
    w = sample_weights(sigma, "edm")
    got = recipe.block_loss(block, {"images": images, "labels": labels}, Noised(z, sigma, keep), w)
    d = block(z, sigma, labels)
    expected = (w * (d - y).pow(2).flatten(1).mean(1)).mean()
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.allclose(d, denoise(z, block.denoiser.raw(z, sigma, labels), sigma))
    drop = keep.clone()
    drop[:, 1] = 0.01  # < class_drop: the null class
    d_null = block(z, sigma, torch.full_like(labels, 10))
    got_null = recipe.block_loss(block, {"images": images, "labels": labels}, Noised(z, sigma, drop), w)
    assert torch.allclose(got_null, (w * (d_null - y).pow(2).flatten(1).mean(1)).mean(), rtol=1e-5)


def test_class_drop_rate_follows_the_uniform(trained, tmp_path):
    from dbcore.method import rng

    u = rng.uniforms_of(torch.arange(20000), 2, 0, 0, 0)[:, 1]
    assert float((u < trained.model.class_drop).float().mean()) == pytest.approx(0.1, abs=0.01)


def test_train_sample_eval_report(trained, tmp_path):
    r = CliRunner()
    out = r.invoke(main, ["sample", str(tmp_path / "db"), "--out", str(tmp_path / "g.png"), "--num", "20",
                          "--npz", str(tmp_path / "g.npz"), "--steps", "4"])
    assert out.exit_code == 0, out.output
    arr = np.load(tmp_path / "g.npz")
    assert arr["images"].shape == (20, 8, 8, 1) and arr["images"].dtype == np.uint8
    assert sorted(np.bincount(arr["labels"]).tolist()) == [2] * 10
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "g.png").convert("L"))  # 20 samples of 8x8, upscaled
    k = next(k for k in range(1, 65) if grid.shape[1] == 8 * k * (grid.shape[1] // (8 * k)) and
             np.array_equal(grid[:8 * k:k, :8 * k:k], arr["images"][0, :, :, 0]))
    assert grid.shape[1] >= 512 and (grid[::k, ::k].repeat(k, 0).repeat(k, 1) == grid).all()
    one = r.invoke(main, ["sample", str(tmp_path / "e2e"), "--out", str(tmp_path / "e.png"), "--num", "3",
                          "--class", "7", "--cfg-scale", "1.5", "--sampler", "heun"])
    assert one.exit_code == 0, one.output
    res = r.invoke(main, ["eval", str(tmp_path / "db"), "--data", "digits:valid", "--json",
                          "--num-samples", "30"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output.strip().splitlines()[-1])
    assert rep["recipe"] == "dit" and rep["num_samples"] == 30
    assert rep["fid"] > 0 and rep["fid_floor"] >= 0 and 0 <= rep["class_accuracy"] <= 1
    e2e = json.loads(r.invoke(main, ["eval", str(tmp_path / "e2e"), "--json", "--num-samples", "30"])
                     .output.strip().splitlines()[-1])
    assert e2e["kind"] == "e2e" and e2e["fid"] > 0
    rp = r.invoke(main, ["report", str(tmp_path / "db"), "--baseline", str(tmp_path / "e2e"), "--num", "10"])
    assert rp.exit_code == 0, rp.output
    assert {p.name for p in (tmp_path / "db/report").iterdir()} == {
        "losses.png", "samples.png", "baseline_samples.png"}


def test_same_seed_same_samples_and_blocks_loaded_once(trained, tmp_path):
    from dbcore.runs.report import sample_run

    a, _, _ = sample_run(tmp_path / "db", num=10, num_steps=4, seed=3)
    b, _, _ = sample_run(tmp_path / "db", num=10, num_steps=4, seed=3)
    c, _, _ = sample_run(tmp_path / "db", num=10, num_steps=4, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_input_is_one_clear_line(trained, tmp_path, cfg_path):
    r = CliRunner()
    bad = r.invoke(main, ["sample", str(tmp_path / "db"), "--out", str(tmp_path / "x.png"), "--class", "12"])
    assert bad.exit_code != 0 and "--class 12 is outside 0..9" in bad.output and "Traceback" not in bad.output
    vit = tmp_path / "vit.toml"
    vit.write_text(TOML.replace('recipe = "dit"', 'recipe = "vit"').replace("sample_steps = 4\n", ""))
    wrong = r.invoke(main, ["train", str(vit), "--store", str(tmp_path / "c.zarr"),
                            "--out", str(tmp_path / "v")])
    assert wrong.exit_code != 0 and "cached for recipe 'dit'" in wrong.output
    # a checkpoint of another recipe in the run directory
    run_json = json.loads((tmp_path / "db/run.json").read_text())
    run_json["config"]["model"] = {**config_mod.load(vit).to_dict()["model"]}
    (tmp_path / "db/run.json").write_text(json.dumps(run_json))
    ev = r.invoke(main, ["eval", str(tmp_path / "db")])
    assert ev.exit_code != 0 and "block0 was trained by recipe 'dit'" in ev.output
    vit_sample = r.invoke(main, ["sample", str(tmp_path / "db"), "--out", str(tmp_path / "y.png")])
    assert vit_sample.exit_code != 0 and "does not generate" in vit_sample.output


def test_interrupted_dit_run_resumes_bit_identical(tmp_path, cfg_path, interrupted_at_step):
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "full", block=1, progress=False)
    with interrupted_at_step(5):  # after the step-3 checkpoint
        train_run(cfg, tmp_path / "c.zarr", tmp_path / "crash", block=1, progress=False)
    assert checkpoint.load_meta(tmp_path / "crash/block1")["step"] == 3
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "crash", block=1, progress=False)
    a, _ = checkpoint.load(tmp_path / "full/block1")
    b, _ = checkpoint.load(tmp_path / "crash/block1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_noise_trains_like_online(tmp_path, cfg_path):
    """With cached noise the DiT still gets its class-drop uniform from the stream."""
    cfg = config_mod.load(cfg_path)
    cfg.train.steps = 2
    write_cache(cfg, load_source("digits:train"), tmp_path / "n.zarr", noise="cached", draws=1,
                progress=False)
    assert layout.noised_z(0) in store.open(tmp_path / "n.zarr").arrays()
    train_run(cfg, tmp_path / "n.zarr", tmp_path / "r", progress=False)
    assert checkpoint.load_meta(tmp_path / "r/block1")["done"]


def test_stream_noise_equals_the_device_path(tmp_path, cfg_path):
    """The Gaussians the stream ships and those the noise kernel draws (its reference here) agree:
    with `gaussians=0` the batch carries only uniforms and `block_noise` draws eps itself."""
    from dbcore.data.stream import BatchStream
    from dbcore.method.batch import EPS
    from dbcore.method.noise import block_noise

    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    recipe = for_config(cfg)
    req = recipe.noise_request(recipe.target_shape({}))
    assert (req.gaussians, req.uniforms) == (64, 2)
    host = BatchStream.for_block(tmp_path / "c.zarr", 1, 50, gaussians=req.gaussians, uniforms=2, seed=3)
    dev = BatchStream.for_block(tmp_path / "c.zarr", 1, 50, gaussians=0, uniforms=2, seed=3)
    law = recipe.sigma_law(1)
    for bh, bd in zip(host, dev, strict=True):
        assert EPS in bh and EPS not in bd
        y = images_to_target(torch.from_numpy(bh["images"]))
        a = block_noise(bh, y, 1, host.epoch, law, seed=0)
        b = block_noise(bd, y, 1, dev.epoch, law, seed=0, backend="torch")
        torch.testing.assert_close(a.sigma, b.sigma, rtol=0, atol=0)
        torch.testing.assert_close(a.z, b.z, rtol=1e-6, atol=1e-5)
        assert torch.equal(a.uniforms, b.uniforms)
