"""The looped (recurrent-depth) LM: causality, KV-cached generation, truncated BPTT, compute ledger,
pipelines, resume and bad configs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from dbcore import config as config_mod
from dbcore.cli import main
from dbcore.data.cache import write_cache
from dbcore.data.sources import load_source
from dbcore.method.batch import Noised
from dbcore.method.options import Options
from dbcore.models.layers import checkpoint_layers, make_target_embedding
from dbcore.models.lm import tokenizer_array
from dbcore.models.tokenizer import char_tokenizer
from dbcore.recipes.looped import (
    LoopedBPTT,
    LoopedConfig,
    LoopedDenoiser,
    LoopedRecipe,
    ancestral_probs,
    context_mask,
    generate,
    looped_tiny,
    poisson_lognormal,
    run_iterations,
)
from dbcore.runs import checkpoint
from dbcore.runs.evaluate import evaluate, sample_text_run
from dbcore.runs.memory import _noised, training_loss
from dbcore.runs.train import train_run

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 12

TOML = """
[model]
recipe = "looped"
seq_len = 16
dim = 32
heads = 2
prelude_layers = 1
core_layers = 1
coda_layers = 1
iterations = 4
{extra}

[train]
steps = 12
batch_size = 16
warmup_steps = 2
checkpoint_every = 5
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text(TEXT)
    return p


def _cfg(tmp_path, extra="train_iterations = 3\nbackprop_iterations = 2"):
    p = tmp_path / "looped.toml"
    p.write_text(TOML.format(extra=extra))
    return p


def _model(kind, seed=0, **overrides):
    cfg = looped_tiny(**overrides)
    torch.manual_seed(seed)
    emb = make_target_embedding(11, cfg.dim, 0)
    tokenizer = torch.from_numpy(tokenizer_array(char_tokenizer("".join(chr(c) for c in range(32, 43)))))
    model = (LoopedDenoiser if kind == "blocks" else LoopedBPTT)(cfg, tokenizer, emb)
    for p in model.parameters():  # zero-initialised projections would hide paths
        torch.nn.init.normal_(p, std=0.2)
    return cfg, model.eval()


def _row_logits(model, cfg, x, noise, iterations=3):
    e, _ = model.context(x[:, :-1])
    logits, _ = run_iterations(model, e, noise, iterations, init_std=cfg.init_std)
    return logits  # (N, T-1, V)


@pytest.mark.parametrize("kind", ["blocks", "e2e"])
def test_row_i_sees_tokens_up_to_i_and_states_up_to_i_only(kind):
    """Row i predicts x_{i+1}: it reads x_0..x_i; the baseline's row reads the states of rows
    0..i, the denoiser's noisy row its own state only (the AR masks)."""
    cfg, model = _model(kind)
    t, d, i = cfg.seq_len, cfg.dim, 6
    x = torch.randint(0, 11, (1, t))
    noise = torch.randn(1, t - 1, d)
    with torch.no_grad():
        base = _row_logits(model, cfg, x, noise)[0, i]
        for j in range(t):  # row i predicts x_{i+1}: it may read x_0..x_i only
            y = x.clone()
            y[0, j] = (y[0, j] + 1) % 11
            moved = not torch.equal(_row_logits(model, cfg, y, noise)[0, i], base)
            assert moved == (j <= i), j
        for j in range(t - 1):
            m = noise.clone()
            m[0, j] += 1.0
            moved = not torch.equal(_row_logits(model, cfg, x, m)[0, i], base)
            assert moved == (j == i if kind == "blocks" else j <= i), j


@pytest.mark.parametrize("kind", ["blocks", "e2e"])
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_kv_cached_iterations_equal_the_parallel_forward(kind, positions):
    cfg, model = _model(kind, positions=positions)
    t, d, k = cfg.seq_len, cfg.dim, 3
    x = torch.randint(0, 11, (2, t))
    noise = torch.randn(2, t - 1, d)
    with torch.no_grad():
        full = _row_logits(model, cfg, x, noise, k)
        p = 5  # a prompt of 5 rows in one pass, then one row at a time
        e, ctx = model.context(x[:, :p])
        logits, caches = run_iterations(model, e, noise[:, :p], k, 0, None, cfg.init_std)
        rows = [logits]
        for pos in range(p, t - 1):
            e, ctx = model.context(x[:, pos:pos + 1], pos, ctx)
            logits, caches = run_iterations(model, e, noise[:, pos:pos + 1], k, pos, caches, cfg.init_std)
            rows.append(logits)
    torch.testing.assert_close(torch.cat(rows, 1), full, atol=1e-5, rtol=1e-5)


def test_context_mask_noisy_rows_see_context_up_to_their_position_and_themselves():
    m = context_mask(3, 6, 2)  # rows at positions 2, 3, 4 after 6 cached context rows
    assert m.shape == (3, 9)
    for j in range(3):
        assert m[j, :6].tolist() == [c <= 2 + j for c in range(6)]
        assert m[j, 6:].tolist() == [k == j for k in range(3)]


def test_denoiser_training_pass_equals_the_joint_masked_forward():
    """The context rows then the noisy rows after their caches (training, eval, generation) equal
    one forward of all 2(T-1) rows under the AR mask, the layout METHOD.md 11 states."""
    cfg, model = _model("blocks")
    t, d = cfg.seq_len - 1, cfg.dim
    x = torch.randint(0, 11, (2, cfg.seq_len))
    z, sigma = torch.randn(2, t, d), torch.tensor([0.7, 3.0])
    with torch.no_grad():
        e, _ = model.context(x[:, :-1])
        _, logits = model.denoise(z, sigma, e, model.context_caches(e))
        # the joint forward, by hand: rows [context; noisy], context causal, noisy i -> context <= i, itself
        from dbcore.method.edm import SIGMA_DATA, precond

        p = precond(sigma.view(-1, 1, 1), SIGMA_DATA)
        noisy = model.adapter(torch.cat([p.c_in * z, e], -1)) + model.noise_embed(p.c_noise.view(-1))[:, None]
        mask = torch.cat([torch.cat([torch.ones(t, t).tril().bool(), torch.zeros(t, t).bool()], 1),
                          context_mask(t, t, 0)])
        pos = torch.cat([torch.arange(t), torch.arange(t)])
        h = torch.cat([e, noisy], 1)
        for layer in model.core:
            h = layer(h, mask, pos)
        d_hat = p.c_skip * z + p.c_out * model.out(model.core_norm(h[:, t:]))
        g = torch.cat([h[:, :t], model.coda_in(d_hat)], 1)
        for layer in model.coda:
            g = layer(g, mask, pos)
        joint = model.head(model.norm(g[:, t:]))
    torch.testing.assert_close(logits, joint, atol=1e-5, rtol=1e-5)


def test_ancestral_likelihood_is_the_distribution_generation_samples():
    """The denoiser's token-ancestral chain, two implementations: the exact-over-tokens
    likelihood (`ancestral_probs`, all rows of a window at once) and KV-cached generation (one
    token at a time) give the same distribution of the next token, and the later levels change it."""
    cfg, model = _model("blocks", target_scale=1.0)
    with torch.no_grad():  # sharper readouts that lean on the noisy state
        model.head.weight.mul_(8.0)
        model.adapter.weight[:, :cfg.dim].mul_(12.0)
    x = torch.randint(0, 11, (1, cfg.seq_len), generator=torch.Generator().manual_seed(3))
    prompt = 7
    with torch.no_grad():
        expect = ancestral_probs(model, x, 3, torch.arange(1), 0, draws=64)[0, prompt - 1]  # (V,) of x_7
        first = ancestral_probs(model, x, 1, torch.arange(1), 0, draws=64)[0, prompt - 1]  # level 0 alone
        rows = x[:, :prompt].repeat(6000, 1)
        out = generate(model, rows, prompt + 1, cfg.seq_len, 3, Options(), torch.Generator().manual_seed(1),
                       sampler="ancestral")
    freq = torch.bincount(out[:, -1], minlength=11).double() / len(out)

    def tv(a, b):
        return 0.5 * float((a.double() - b.double()).abs().sum())

    assert tv(freq, expect) < 0.04, (tv(freq, expect), tv(first, expect))
    assert tv(first, expect) > 0.06 and tv(freq, first) > 0.06  # the later levels matter


def test_huginn_iteration_counts_have_the_configured_mean():
    u = torch.rand(4000, 2, generator=torch.Generator().manual_seed(0)).tolist()
    counts = torch.tensor([poisson_lognormal(a, b, 8) for a, b in u]).float()
    assert counts.min() >= 1
    assert abs(float(counts.mean()) - 9.0) < 0.3  # Poisson(e^tau) + 1 with E[e^tau] = 8
    assert 8 < float(counts.var()) < 40  # wider than Poisson(8) alone: the lognormal rate
    assert poisson_lognormal(0.5, 0.999, 8) > poisson_lognormal(0.5, 0.5, 8) > poisson_lognormal(0.01, 0.5, 8)


def test_baseline_back_propagates_through_the_last_k_iterations_only(tmp_path):
    cfg = config_mod.load(_cfg(tmp_path, "backprop_iterations = 2\ntrain_iterations = 6"))
    recipe = LoopedRecipe(cfg)
    frozen = recipe.example_frozen()
    model = recipe.build_e2e(frozen)
    batch = recipe.example_batch(4, frozen, torch.device("cpu"))
    graded = []
    model.core[0].attn.qkv.register_forward_hook(lambda mod, inp, out: graded.append(torch.is_grad_enabled()))
    for u in (0.1, 0.5, 0.9):
        graded.clear()
        noised = Noised(torch.randn(4, 15, 32), torch.ones(4), torch.tensor([[0.3, u, 0.6]]))
        r, k = recipe.baseline_iterations(noised)
        recipe.e2e_loss(model, batch, noised, None).backward()
        assert len(graded) == r and graded == [False] * (r - k) + [True] * k
        assert recipe.step_passes("e2e", noised)["core"] == (r, k)


@pytest.mark.parametrize("overrides, words", [({"num_blocks": 2}, "num_blocks must be 1"),
                                              ({"depth": 5}, "depth 5 is not prelude"),
                                              ({"core_layers": 0}, "core_layers >= 1"),
                                              ({"sigma_dist": "top"}, "sigma_dist"),
                                              ({"backprop_iterations": 0}, ">= 1")])
def test_bad_looped_configs_name_the_key(overrides, words):
    with pytest.raises(ValueError, match=words):
        LoopedConfig(**overrides)


# ----------------------------------------------------------------------------- pipelines


def test_cache_train_eval_sample_and_the_compute_ledger(tmp_path, text):
    cfg = config_mod.load(_cfg(tmp_path))
    write_cache(cfg, load_source(f"text:{text}"), tmp_path / "c.zarr", progress=False)
    (blocks,) = train_run(cfg, tmp_path / "c.zarr", tmp_path / "blocks", progress=False)
    (e2e,) = train_run(cfg, tmp_path / "c.zarr", tmp_path / "e2e", e2e=True, progress=False)
    assert blocks["compute"]["passes"] == {"prelude": [12, 12], "context": [12, 12], "core": [12, 12],
                                           "coda": [12, 12]}
    core = e2e["compute"]["passes"]["core"]
    assert core[0] > core[1] >= 12 and core[1] <= 2 * 12  # r iterations forward, min(r, k) backward
    from dbcore.data import store as store_mod
    from dbcore.data.frozen import read_frozen
    from dbcore.method.flops import BACKWARD_FACTOR

    recipe = LoopedRecipe(cfg)
    per_pass = recipe.pass_flops(16, read_frozen(store_mod.open(tmp_path / "c.zarr"), recipe.frozen_arrays))
    for run in (blocks, e2e):  # every pass of every module at its forward FLOPs, backward at 2x
        c = run["compute"]
        expect = sum((f + BACKWARD_FACTOR * b) * per_pass[name] for name, (f, b) in c["passes"].items())
        assert c["flops"] == pytest.approx(expect, rel=1e-9) and c["flops"] > 0
    assert per_pass["context"] > 0.5 * per_pass["core"]  # the context rows cost about a core pass
    _, meta = checkpoint.load(tmp_path / "e2e/e2e")
    assert meta["compute"] == e2e["compute"]  # kept with the checkpoint
    valid = tmp_path / "valid.txt"
    valid.write_text(TEXT[:400])
    for run in (tmp_path / "blocks", tmp_path / "e2e"):
        for k in (1, 4):
            for sampler in ([None] if run.name == "e2e" else ["euler", "ancestral"]):
                r = evaluate(run, f"text:{valid}", k, num_samples=8, eval_chains=2, sampler=sampler)
                assert r["num_windows"] == 8 and r["iterations"] == k and 0 < r["bpc"] < 10
                if sampler == "ancestral":
                    assert (r["estimator"], r["eval_tail"]) == ("stratified", 2)
        texts = sample_text_run(run, {"num": 2, "length": 12, "prompt": "To"})
        assert len(texts) == 2 and all(len(x) == 12 and x.startswith("To") for x in texts)


@pytest.mark.parametrize("e2e", [False, True])
def test_resume_is_bit_identical_with_its_ledger(tmp_path, text, interrupted_at_step, e2e):
    cfg = config_mod.load(_cfg(tmp_path))
    write_cache(cfg, load_source(f"text:{text}"), tmp_path / "c.zarr", progress=False)
    (full,) = train_run(cfg, tmp_path / "c.zarr", tmp_path / "full", e2e=e2e, progress=False)
    with interrupted_at_step(8):
        train_run(cfg, tmp_path / "c.zarr", tmp_path / "crash", e2e=e2e, progress=False)
    (resumed,) = train_run(cfg, tmp_path / "c.zarr", tmp_path / "crash", e2e=e2e, progress=False)
    name = "e2e" if e2e else "block0"
    a, _ = checkpoint.load(tmp_path / "full" / name, prefix="model.")
    b, _ = checkpoint.load(tmp_path / "crash" / name, prefix="model.")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["resumed_at"] == 5 and resumed["compute"] == full["compute"]


def test_cli_eval_json_and_bad_prompt(tmp_path, text):
    cfg_path = _cfg(tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["cache", str(cfg_path), "--data", f"text:{text}", "--out",
                             str(tmp_path / "c.zarr")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["train", str(cfg_path), "--store", str(tmp_path / "c.zarr"), "--out",
                             str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "run"), "--data", f"text:{text}", "--json",
                             "--num-samples", "4", "--steps", "2", "--chains", "2"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert {"bpc", "num_tokens"} <= set(out) and out["iterations"] == 2 and out["eval_chains"] == 2
    r = runner.invoke(main, ["sample", str(tmp_path / "run"), "--prompt", "Zürich", "--length", "12"])
    assert r.exit_code == 1 and "not in the vocabulary" in r.output and "--prompt" in r.output


# ----------------------------------------------------------------------------- frozen prelude


def _train_cli(runner, cfg_path, store, out, *extra):
    return runner.invoke(main, ["train", str(cfg_path), "--store", str(store), "--out", str(out), "--quiet",
                                *extra])


def test_frozen_prelude_caches_its_activations_once_and_trains_core_and_coda_from_them(tmp_path, text,
                                                                                        monkeypatch):
    from dbcore.data import store as store_mod
    from dbcore.recipes.looped import PRELUDE_KEYS, PRELUDE_OUT
    from dbcore.runs import frozen_module

    cfg_path = _cfg(tmp_path)
    runner = CliRunner()
    store = tmp_path / "c.zarr"
    r = runner.invoke(main, ["cache", str(cfg_path), "--data", f"text:{text}", "--out", str(store)])
    assert r.exit_code == 0, r.output
    assert _train_cli(runner, cfg_path, store, tmp_path / "prelude").exit_code == 0
    prelude, _ = checkpoint.load(tmp_path / "prelude/block0", prefix="model.")
    fp = frozen_module.fingerprint(frozen_module.module_tensors(prelude, PRELUDE_KEYS))

    real_write = store_mod.ArrayWriter.write  # a crash while the activations are written

    def crash(self, start, rows):
        if self.name == PRELUDE_OUT and start > 0:
            raise KeyboardInterrupt
        return real_write(self, start, rows)

    monkeypatch.setattr(frozen_module, "ROWS_PER_PASS", 32)
    monkeypatch.setattr(store_mod.ArrayWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        cfg = config_mod.load(cfg_path)
        cfg.model.frozen_prelude = str(tmp_path / "prelude")
        train_run(cfg, store, tmp_path / "frozen", progress=False)
    sub = store / f"prelude_{fp[:16]}"
    assert not sub.exists() and sub.with_name(sub.name + ".partial").exists()  # nothing looks finished
    monkeypatch.setattr(store_mod.ArrayWriter, "write", real_write)

    for kind in ([], ["--e2e"]):
        r = _train_cli(runner, cfg_path, store, tmp_path / f"frozen{len(kind)}", "--freeze-prelude",
                       str(tmp_path / "prelude"), *kind)
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["compute"]["passes"]["prelude"] == [0, 0]
    acts = store_mod.open(sub)
    assert acts.attrs["frozen_prelude"]["fingerprint"] == fp
    assert not sub.with_name(sub.name + ".partial").exists()
    tokens = torch.from_numpy(acts.read("tokens", slice(0, 4))).long()
    model = LoopedRecipe(config_mod.load(cfg_path)).build_block(0, {
        "tokenizer": torch.from_numpy(acts.read("tokenizer")),
        "target_embedding": torch.from_numpy(acts.read("target_embedding"))})
    model.load_state_dict(prelude)
    with torch.no_grad():
        e, _ = model.context(tokens[:, :-1])
    torch.testing.assert_close(torch.from_numpy(acts.read("prelude_out", slice(0, 4))).float(), e,
                               atol=2e-2, rtol=2e-3)  # float16 in the store
    trained, _ = checkpoint.load(tmp_path / "frozen0/block0", prefix="model.")
    frozen = frozen_module.module_tensors(prelude, PRELUDE_KEYS)
    assert all(torch.equal(trained[k], v) for k, v in frozen.items())
    assert not torch.equal(trained["core.0.attn.qkv.weight"], prelude["core.0.attn.qkv.weight"])
    r = runner.invoke(main, ["eval", str(tmp_path / "frozen0"), "--data", f"text:{text}", "--json",
                             "--num-samples", "4", "--chains", "2"])
    assert r.exit_code == 0 and json.loads(r.output)["bpc"] > 0, r.output

    # the prelude run retrained in place: the run that trained on its old weights refuses them
    assert _train_cli(runner, cfg_path, store, tmp_path / "prelude2", "--steps", "6").exit_code == 0
    shutil.rmtree(tmp_path / "prelude")
    shutil.copytree(tmp_path / "prelude2", tmp_path / "prelude")
    r = _train_cli(runner, cfg_path, store, tmp_path / "frozen0", "--freeze-prelude",
                   str(tmp_path / "prelude"))
    assert r.exit_code == 1 and "trained on the frozen prelude" in r.output, r.output


def test_freeze_prelude_is_refused_for_other_recipes_and_unfinished_runs(tmp_path, text):
    runner = CliRunner()
    cfg_path = _cfg(tmp_path)
    store = tmp_path / "c.zarr"
    r = runner.invoke(main, ["cache", str(cfg_path), "--data", f"text:{text}", "--out", str(store)])
    assert r.exit_code == 0, r.output
    r = _train_cli(runner, cfg_path, store, tmp_path / "x", "--freeze-prelude", str(tmp_path / "nowhere"))
    assert r.exit_code == 1 and "no run.json" in r.output
    vit = tmp_path / "vit.toml"
    vit.write_text('[model]\nrecipe = "vit"\ndim = 32\ndepth = 2\nheads = 2\nnum_blocks = 2\n')
    r = _train_cli(runner, vit, store, tmp_path / "y", "--freeze-prelude", str(tmp_path))
    assert r.exit_code == 1 and "looped only" in r.output


@pytest.mark.parametrize("kind", ["blocks", "e2e"])
def test_checkpointed_layers_over_batch_slices_give_the_same_gradients(tmp_path, kind):
    """Activation checkpointing over 3 slices of the batch, through the decoding path (`step`
    with cached prefixes) that training runs: the plain model's gradients."""
    cfg = config_mod.load(_cfg(tmp_path))
    recipe = LoopedRecipe(cfg)
    frozen = recipe.example_frozen()
    batch = recipe.example_batch(5, frozen, torch.device("cpu"))
    block = 0 if kind == "blocks" else None
    noised = _noised(recipe, batch, frozen, block)
    grads = []
    for chunks in (None, 3):
        torch.manual_seed(0)
        model = recipe.build_block(0, frozen) if kind == "blocks" else recipe.build_e2e(frozen)
        if chunks:
            checkpoint_layers(model, chunks)
        torch.manual_seed(1)
        training_loss(recipe, model.train(), batch, frozen, block, noised).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)
