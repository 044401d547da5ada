"""The recipe interface: registry, optimizer groups, EDM preconditioning, the run directory."""

import json

import pytest
import torch
from torch import nn

from dbcore import config as config_mod
from dbcore.method.edm import EDMPrecond, precond
from dbcore.recipes import REGISTRY, for_config, recipe_class
from dbcore.recipes.base import Recipe, decayed_parameters
from dbcore.runs import rundir
from dbcore.runs.loop import make_optimizer


def _cfg(recipe="vit", **model):
    base = {"dim": 32, "depth": 2, "heads": 2, "num_blocks": 2}
    if recipe == "looped":  # one block: the core shared by every iteration
        base = {"dim": 32, "heads": 2, "seq_len": 16, "prelude_layers": 1, "core_layers": 1, "coda_layers": 1}
    elif recipe_class(recipe).source_kind == "images":
        base |= {"image_size": 8, "patch_size": 2}
    else:
        base |= {"seq_len": 16, "sample_steps": 4}
    return config_mod.from_dict({"model": {"recipe": recipe, **base, **model}}, f"{recipe}.toml")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_recipe_builds_blocks_that_share_nothing(name):
    recipe = for_config(_cfg(name))
    assert isinstance(recipe, Recipe) and recipe_class(name).name == name
    frozen = recipe.example_frozen()
    m = recipe.model_cfg
    ids = [0, 1 % m.num_blocks]  # two blocks (block 0 twice for a one-block recipe)
    b0, b1 = (recipe.build_block(b, frozen) for b in ids)
    ptrs = [{p.data_ptr() for p in b.parameters()} for b in (b0, b1)]
    assert not ptrs[0] & ptrs[1]
    assert len(b0.layers) == len(b1.layers) == m.depth // m.num_blocks
    batch = recipe.example_batch(4, frozen, torch.device("cpu"))
    from dbcore.runs.memory import _noised, training_loss

    for block, b in zip((b0, b1), ids, strict=True):
        loss = training_loss(recipe, block, batch, frozen, b, _noised(recipe, batch, frozen, b))
        loss.backward()
        assert torch.isfinite(loss)
    e2e = recipe.build_e2e(frozen)
    assert len(e2e.layers) == m.depth
    noised = _noised(recipe, batch, frozen, None) if recipe.e2e_noise else None
    assert torch.isfinite(training_loss(recipe, e2e, batch, frozen, None, noised))


def test_unknown_recipe_is_a_clear_config_error():
    with pytest.raises(config_mod.ConfigError, match="recipe: expected one of .*'vit'.*found 'gan'"):
        config_mod.from_dict({"model": {"recipe": "gan"}}, "x.toml")


def test_optimizer_decays_only_weight_matrices():
    cfg = _cfg()
    recipe = for_config(cfg)
    block = recipe.build_block(0, recipe.example_frozen())
    decay, rest = decayed_parameters(block)
    names = {id(p): n for n, p in block.named_parameters()}
    decayed = {names[id(p)] for p in decay}
    assert all(n.endswith(".weight") for n in decayed)
    assert "denoiser.backbone.pos_embed" not in decayed
    assert not any("bias" in n or "norm" in n for n in decayed)
    assert "denoiser.backbone.layers.0.attn.qkv.weight" in decayed
    assert "denoiser.backbone.patch_embed.weight" in decayed  # a convolution's kernel is a matrix
    assert len(decay) + len(rest) == len(list(block.parameters()))
    opt = make_optimizer(block, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.train.weight_decay, 0.0]
    cfg.train.decay = "all"
    assert [g["weight_decay"] for g in make_optimizer(block, cfg).param_groups] == [cfg.train.weight_decay]
    # a step moves no undecayed parameter whose gradient is zero
    cfg.train.decay = "matrices"
    opt = make_optimizer(block, cfg)
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    for p in block.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {n for n, p in block.named_parameters() if not torch.equal(before[n], p)}
    assert moved and moved <= decayed


class _Affine(nn.Module):
    def forward(self, x_in, c_noise, scale):
        self.seen = (x_in, c_noise)
        return scale * x_in


def test_edm_precond_wraps_any_backbone():
    net = EDMPrecond(_Affine())
    z, sigma = torch.randn(3, 2, 4), torch.tensor([0.1, 1.0, 10.0])
    d = net(z, sigma, 2.0)
    p = precond(sigma[:, None, None])
    assert torch.allclose(net.backbone.seen[0], p.c_in * z)  # (N, T, d) with sigma[:, None, None]
    assert torch.allclose(net.backbone.seen[1], torch.log(sigma) / 4)
    assert torch.allclose(d, p.c_skip * z + p.c_out * 2.0 * p.c_in * z)
    assert torch.allclose(net(z, torch.tensor(0.5), 2.0)[0], net(z[:1], torch.tensor([0.5]), 2.0)[0])


def test_run_directory_errors(tmp_path):
    with pytest.raises(rundir.RunError, match="no run.json"):
        rundir.read_run_json(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"kind": "weird"}))
    with pytest.raises(rundir.RunError, match="expected fields 'kind'"):
        rundir.read_run_json(tmp_path)
    cfg = _cfg()
    run = tmp_path / "r"
    rundir.write_run_json(run, cfg.to_dict(), tmp_path / "s.zarr", "blocks")
    with pytest.raises(rundir.RunError, match="another config"):
        rundir.write_run_json(run, _cfg(depth=4).to_dict(), tmp_path / "s.zarr", "blocks")
    with pytest.raises(rundir.RunError, match="holds a blocks run, not a e2e run"):
        rundir.write_run_json(run, cfg.to_dict(), tmp_path / "s.zarr", "e2e")
    # a run recorded before a release added a key (at its default) still resumes
    old = json.loads((run / "run.json").read_text())
    del old["config"]["model"]["conditioning"], old["config"]["train"]["ray_cpus"]
    (run / "run.json").write_text(json.dumps(old))
    rundir.write_run_json(run, cfg.to_dict(), tmp_path / "s.zarr", "blocks")
    with pytest.raises(rundir.RunError, match="another config"):
        rundir.write_run_json(run, _cfg(conditioning="adaln-single").to_dict(), tmp_path / "s.zarr", "blocks")
    with pytest.raises(rundir.RunError, match="no metrics"):
        rundir.read_metrics(run)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_recipe_trains_under_bf16_autocast_with_fp32_master_weights(name):
    from dbcore.runs.memory import _noised, training_loss
    from dbcore.runs.step import autocast_for

    recipe = for_config(_cfg(name))
    frozen = recipe.example_frozen()
    batch = recipe.example_batch(4, frozen, torch.device("cpu"))
    for block in (0, None):
        model = recipe.build_block(0, frozen) if block == 0 else recipe.build_e2e(frozen)
        noised = _noised(recipe, batch, frozen, block) if block == 0 or recipe.e2e_noise else None
        with autocast_for("bf16", torch.device("cpu")):
            loss = training_loss(recipe, model, batch, frozen, block, noised)
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_precision_is_checked_and_fp32_runs_without_autocast():
    from dbcore.runs.step import autocast_for

    with pytest.raises(config_mod.ConfigError, match="precision"):
        config_mod.from_dict({"model": {"recipe": "vit"}, "train": {"precision": "fp16"}}, "x.toml")
    assert not torch.is_autocast_enabled("cpu")
    with autocast_for("auto", torch.device("cpu")):  # auto: fp32 off CUDA
        assert not torch.is_autocast_enabled("cpu")
    with autocast_for("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
