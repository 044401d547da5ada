"""cache -> train -> eval on digits, through the Python API and the CLI, with resume and faults."""

import json

import pytest
import torch
from click.testing import CliRunner

from dbcore import config as config_mod
from dbcore.cli import main
from dbcore.data import store
from dbcore.data.cache import write_cache
from dbcore.data.sources import load_source
from dbcore.method import layout
from dbcore.method.noise import noised_targets
from dbcore.recipes import for_config
from dbcore.runs import checkpoint
from dbcore.runs.evaluate import evaluate
from dbcore.runs.train import RunError, train_run

TOML = """
[model]
image_size = 8
channels = 1
patch_size = 4
dim = 32
depth = 2
heads = 2
mlp_ratio = 2.0
num_blocks = 2

[train]
steps = 12
batch_size = 32
warmup_steps = 2
checkpoint_every = 5
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cfg_path(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TOML)
    return p


def _weights(run, name):
    tensors, _ = checkpoint.load(run / name, prefix="model.")
    return tensors


def test_cache_train_eval_both_kinds(tmp_path, cfg_path):
    cfg = config_mod.load(cfg_path)
    s = write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", noise="online", progress=False)
    assert store.open(s.path).attrs["source"]["num_samples"] == 1437
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "blocks", progress=False)
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "e2e", e2e=True, progress=False)
    for run, kind in ((tmp_path / "blocks", "blocks"), (tmp_path / "e2e", "e2e")):
        r = evaluate(run, "digits:valid")
        assert r["kind"] == kind and r["num_samples"] == 360
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "blocks/metrics.jsonl").read_text().splitlines()]
    assert {m["name"] for m in metrics} == {"block0", "block1"}


def test_resume_from_mid_run_checkpoint(tmp_path, cfg_path, interrupted_at_step):
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "full", block=0, progress=False)

    from dbcore.runs import train as train_mod

    with interrupted_at_step(8):  # after the step-5 checkpoint, before the end
        train_mod.train_run(cfg, tmp_path / "c.zarr", tmp_path / "crash", block=0, progress=False)
    assert checkpoint.load_meta(tmp_path / "crash/block0")["step"] == 5
    train_mod.train_run(cfg, tmp_path / "c.zarr", tmp_path / "crash", block=0, progress=False)
    a, b = _weights(tmp_path / "full", "block0"), _weights(tmp_path / "crash", "block0")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_noise_equals_online_noise(tmp_path, cfg_path):
    cfg = config_mod.load(cfg_path)
    src = load_source("digits:train")
    s = write_cache(cfg, src, tmp_path / "c.zarr", noise="cached", draws=2, seed=7, progress=False)
    s = store.open(s.path)
    emb = torch.from_numpy(s.read(layout.TARGET_EMBEDDING, slice(None)))
    rows = [3, 100, 1400]
    idx = torch.tensor(rows)
    z_cached = torch.from_numpy(s.read(layout.noised_z(1), idx.numpy()))  # (3, K, d)
    sigma_cached = torch.from_numpy(s.read(layout.noised_sigma(1), idx.numpy()))
    law = for_config(cfg).sigma_law(1)
    z, sigma = noised_targets(emb[torch.from_numpy(src.labels[rows])], idx, 7, 1, 1, law)
    assert torch.allclose(z_cached[:, 1], z) and torch.allclose(sigma_cached[:, 1], sigma)


def test_top_sigma_law_reaches_the_cache_at_the_samplers_levels(tmp_path, cfg_path):
    from dbcore.method.partition import euler_schedule

    cfg = config_mod.load(cfg_path)
    cfg.model.sigma_dist = "top"
    s = write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", noise="cached", draws=2,
                    progress=False)
    s = store.open(s.path)
    levels = [step.sigma for step in euler_schedule(cfg.model.num_blocks, cfg.model.num_blocks)]
    laws = s.attrs["schedule"]["block_sigma_laws"]
    for b, level in enumerate(levels):
        assert laws[b][0] == pytest.approx(level) and laws[b][1] == pytest.approx(level)
        sigma = s.read(layout.noised_sigma(b), slice(None))  # (N, K)
        assert sigma.min() == pytest.approx(level, rel=1e-6) and sigma.max() == pytest.approx(level, rel=1e-6)


def test_sequential_mode_refuses_states_from_other_checkpoints(tmp_path, cfg_path):
    cfg = config_mod.load(cfg_path)
    cfg.train.mode = "sequential"
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "seq", progress=False)
    chain = tmp_path / "seq/chain/block1.zarr"
    assert store.open(chain).read("z", slice(0, 4)).shape == (4, 32)
    # retrain block 0 with another seed: the cached chain states no longer match its checkpoint
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"seq/block0{suffix}").unlink()
    cfg.train.seed = 1
    with pytest.raises(RunError, match="another config|other checkpoints"):
        train_run(cfg, tmp_path / "c.zarr", tmp_path / "seq", progress=False)


def test_train_refuses_a_store_of_another_config(tmp_path, cfg_path):
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    cfg.model.target_scale = 2.0
    with pytest.raises(RunError, match=r"other values of \['target_scale'\]"):
        train_run(cfg, tmp_path / "c.zarr", tmp_path / "r", progress=False)


def test_cache_does_not_depend_on_depth_or_gates(tmp_path, cfg_path):
    """Only what the cache holds is in its fingerprint: a deeper model or other gates train from it."""
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    cfg.model.depth, cfg.model.gate_init, cfg.model.sigma_dist = 4, 1.0, "top"
    cfg.train.steps = 2
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "r", progress=False)
    # cached noise depends on the schedule: a store with noised targets refuses another B
    write_cache(cfg, load_source("digits:train"), tmp_path / "n.zarr", noise="cached", draws=1,
                progress=False)
    cfg.model.num_blocks, cfg.model.depth = 4, 4
    with pytest.raises(RunError, match="num_blocks"):
        train_run(cfg, tmp_path / "n.zarr", tmp_path / "r4", progress=False)


def test_train_refuses_a_store_of_another_recipe(tmp_path, cfg_path):
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    dit = config_mod.from_dict({"model": {"recipe": "dit", "image_size": 8, "patch_size": 2, "dim": 32,
                                          "depth": 2, "heads": 2}}, "dit.toml")
    with pytest.raises(RunError, match="cached for recipe 'vit'.*recipe 'dit'"):
        train_run(dit, tmp_path / "c.zarr", tmp_path / "d", progress=False)


def test_cli_cache_train_eval_and_clean_errors(tmp_path, cfg_path):
    r = CliRunner()
    store_path = str(tmp_path / "c.zarr")
    out = r.invoke(main, ["cache", str(cfg_path), "--data", "digits:train", "--out", store_path])
    assert out.exit_code == 0, out.output
    again = r.invoke(main, ["cache", str(cfg_path), "--out", str(tmp_path / "c.zarr")])
    assert again.exit_code != 0 and "Traceback" not in again.output and "exist" in again.output
    out = r.invoke(main, ["train", str(cfg_path), "--store", str(tmp_path / "c.zarr"), "--out",
                          str(tmp_path / "run"), "--steps", "3", "--quiet"])
    assert out.exit_code == 0, out.output
    out = r.invoke(main, ["eval", str(tmp_path / "run"), "--data", "digits:valid", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert {"accuracy", "loss"} <= set(result)
    # along the chain: one entry per block, the last one is the prediction itself
    blocks = config_mod.load(cfg_path).model.num_blocks
    assert [p["block"] for p in result["per_block"]] == list(range(blocks))
    key = "accuracy_product" if result["decode"] == "product" else "accuracy_last"
    assert result["per_block"][-1][key] == pytest.approx(result["accuracy"], abs=1e-6)
    other = "product" if result["decode"] == "last" else "last"
    out = r.invoke(main, ["eval", str(tmp_path / "run"), "--data", "digits:valid", "--json",
                          "--decode", other])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["decode"] == other
    missing = ["--data", "npz:/nonexistent.npz", "--out", str(tmp_path / "x")]
    bad = r.invoke(main, ["cache", str(cfg_path), *missing])
    assert bad.exit_code != 0 and "not found" in bad.output and "Traceback" not in bad.output
    (tmp_path / "bad.toml").write_text("[model]\nwidth = 3\n")
    bad = r.invoke(main, ["cache", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "y")])
    assert bad.exit_code != 0 and "unknown key(s) ['width']" in bad.output


def test_target_mixing_keeps_labels_and_is_reproducible():
    from dbcore.method.noise import mix_targets
    from dbcore.models.layers import make_target_embedding

    emb = make_target_embedding(10, 16, 0)
    labels = torch.arange(1000) % 10
    sample = torch.arange(1000)
    a = mix_targets(emb, labels, sample, 0, 1, 0, 0.5)
    assert torch.equal(a, mix_targets(emb, labels, sample, 0, 1, 0, 0.5))
    unchanged = (a == emb[labels]).all(dim=1)
    assert 0.4 < unchanged.float().mean() < 0.6  # about half mixed
    # a mixed row lies between the label's row and another class's row
    coeff = (a[~unchanged] @ emb.T)  # (M, V)
    assert (coeff.argmax(dim=1) != labels[~unchanged]).any()  # some point at the other class
    assert torch.equal(mix_targets(emb, labels, sample, 0, 1, 0, 0.0), emb[labels])


def test_target_embedding_from_a_file(tmp_path, cfg_path):
    import numpy as np

    rows = np.random.default_rng(0).normal(size=(10, 32)).astype(np.float32)
    np.save(tmp_path / "e.npy", rows)
    r = CliRunner()
    out = r.invoke(main, ["cache", str(cfg_path), "--out", str(tmp_path / "c.zarr"),
                          "--target-embedding", str(tmp_path / "e.npy")])
    assert out.exit_code == 0, out.output
    s = store.open(tmp_path / "c.zarr")
    assert np.array_equal(s.read(layout.TARGET_EMBEDDING), rows)
    assert s.attrs["target_embedding"]["kind"] == "file"
    np.save(tmp_path / "bad.npy", rows[:, :5])
    bad = r.invoke(main, ["cache", str(cfg_path), "--out", str(tmp_path / "d.zarr"),
                          "--target-embedding", str(tmp_path / "bad.npy")])
    assert bad.exit_code != 0 and "expected shape (10, 32)" in bad.output
    assert not (tmp_path / "d.zarr").exists()


def test_paper_shared_mode_ties_modules_trains_and_evaluates(tmp_path, cfg_path):
    from dbcore.runs.paper_shared import SharedBlocks, block_of_step

    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    emb = torch.zeros(10, 32)
    shared = SharedBlocks(for_config(cfg), {"target_embedding": emb})
    b0, b1 = shared.blocks
    assert b0.head is b1.head and b0.denoiser.backbone.patch_embed is b1.denoiser.backbone.patch_embed
    assert b0.denoiser.backbone.pos_embed is b1.denoiser.backbone.pos_embed
    assert b0.layers is not b1.layers
    layer_ids = {id(p) for b in (b0, b1) for p in b.layers.parameters()}
    shared_ids = {id(p) for p in shared.parameters()} - layer_ids
    outside = {id(p) for n, p in b0.named_parameters() if not n.startswith("denoiser.backbone.layers")}
    assert shared_ids == outside
    assert {block_of_step(s, 0, 2) for s in range(50)} == {0, 1}
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "p", paper_shared=True, progress=False)
    meta = checkpoint.load_meta(tmp_path / "p/shared")
    assert meta["done"] and meta["step"] == 2 * cfg.train.steps  # B x the per-block budget
    r = evaluate(tmp_path / "p", "digits:valid")
    assert r["kind"] == "paper-shared" and 0.0 <= r["accuracy"] <= 1.0


@pytest.mark.parametrize("e2e", [False, True])
def test_activation_checkpointing_trains_the_same_weights(tmp_path, cfg_path, e2e):
    """Checkpointed layers, recomputed over 3 slices of the batch: a block (or the baseline)
    trains the same weights as without."""
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", noise="online", progress=False)
    which = ["--e2e"] if e2e else ["--block", "1"]
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "plain", block=None if e2e else 1, e2e=e2e, progress=False)
    args = ["train", str(cfg_path), "--store", str(tmp_path / "c.zarr"), "--out", str(tmp_path / "ac"),
            *which, "--activation-checkpointing", "--checkpoint-chunks", "3", "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    name = "e2e" if e2e else "block1"
    a, b = _weights(tmp_path / "plain", name), _weights(tmp_path / "ac", name)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("attn.qkv.bias"):
            # the key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared
            # by all keys): Adam's normalised steps follow the rounding noise there
            d = a[k].shape[0] // 3
            a[k], b[k] = torch.cat([a[k][:d], a[k][2 * d:]]), torch.cat([b[k][:d], b[k][2 * d:]])
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    r = CliRunner().invoke(main, [*args[:-4], "--checkpoint-chunks", "3", "--quiet"])
    assert r.exit_code != 0 and "--checkpoint-chunks needs --activation-checkpointing" in r.output


def test_bf16_training_keeps_fp32_checkpoints_and_learns(tmp_path, cfg_path):
    cfg = config_mod.load(cfg_path)
    cfg.train.precision = "bf16"
    write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", noise="online", progress=False)
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "bf16", block=0, progress=False)
    weights = _weights(tmp_path / "bf16", "block0")
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())
    losses = [json.loads(x)["loss"] for x in (tmp_path / "bf16/metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_batches_to_the_cpu_are_the_streamed_arrays():
    import numpy as np

    from dbcore.method.batch import INDEX
    from dbcore.runs.loop import to_device

    batch = {"tokens": np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2], INDEX: np.arange(3)}
    out = to_device(batch, ("tokens",), torch.device("cpu"))
    assert not out["tokens"].is_pinned() and out["tokens"].tolist() == [[0, 2], [4, 6], [8, 10]]
    assert out[INDEX].tolist() == [0, 1, 2]
