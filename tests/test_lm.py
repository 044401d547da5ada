"""The language-model recipes (mdlm, arlm): masks, KV-cached decoding, masking noise, the ELBO,
and cache -> train -> eval -> sample on a small text with resume and clean errors."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dbcore import config as config_mod
from dbcore.cli import main
from dbcore.data.cache import write_cache
from dbcore.data.sources import load_source
from dbcore.data.text import load_text
from dbcore.method import layout
from dbcore.method.edm import SIGMA_MAX
from dbcore.method.options import Options
from dbcore.models.ancestral import LevelNoise
from dbcore.models.layers import make_target_embedding
from dbcore.models.lm import tokenizer_array, tokenizer_of
from dbcore.models.tokenizer import char_tokenizer
from dbcore.recipes import for_config
from dbcore.recipes.arlm import ARBaseline, ARBlock, _level_probs, ar_mask, arlm_tiny
from dbcore.recipes.mdlm import MASK, elbo_weight, mask_probability, time_slice
from dbcore.runs import checkpoint
from dbcore.runs.evaluate import evaluate, sample_text_run
from dbcore.runs.train import train_run

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 12

TOML = """
[model]
recipe = "{recipe}"
seq_len = 16
dim = 32
depth = 2
heads = 2
num_blocks = 2
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


def _cfg(tmp_path, recipe, extra=""):
    p = tmp_path / f"{recipe}.toml"
    p.write_text(TOML.format(recipe=recipe, extra=extra))
    return p


# ----------------------------------------------------------------------------- AR masks and decoding


def test_ar_mask_noisy_rows_see_the_clean_prefix_and_themselves_only():
    t = 5
    m = ar_mask(t)
    for r in range(t):  # clean rows: causal, never a noisy column
        assert m[r, : r + 1].all() and not m[r, r + 1 :].any()
    for i in range(t):  # noisy row T+i: clean < i, itself
        row = m[t + i]
        assert row[:i].all() and not row[i:t].any()
        assert row[t + i] and row[t:].sum() == 1


def _tokenizer(chars: str) -> torch.Tensor:
    """The frozen `tokenizer` array of a character vocabulary."""
    return torch.from_numpy(tokenizer_array(char_tokenizer(chars)))


def _ar_block(seed=0, positions="rope"):
    torch.manual_seed(seed)
    cfg = arlm_tiny(gate_init=1.0, positions=positions)
    block = ARBlock(cfg, 2, _tokenizer("abcdefghijk"), make_target_embedding(11, cfg.dim, 0))
    for p in block.parameters():  # a trained-looking block: no zero-initialised shortcut
        p.data.normal_(0, 0.2)
    return cfg, block.eval()


def test_ar_block_has_no_path_from_a_token_to_its_own_prediction():
    """dF_i/dz_j = 0 for j != i (noisy rows never meet) and dF_i/dx_j = 0 for j >= i (no future,
    not token i itself), through the block's real forward."""
    cfg, block = _ar_block()
    t, d = cfg.seq_len, cfg.dim
    x = torch.randint(0, 11, (1, t))
    emb = block.denoiser.backbone.embed.table
    z = torch.randn(1, t, d, requires_grad=True)
    h_clean = emb(x).detach().requires_grad_(True)
    bb = block.denoiser.backbone
    hook = emb.register_forward_hook(lambda m, i, o: h_clean)  # the clean embeddings as a leaf
    try:
        f = bb(z, torch.zeros(1), x)  # (1, T, d)
    finally:
        hook.remove()
    for i in range(t):
        gz, gx = torch.autograd.grad(f[0, i].sum(), (z, h_clean), retain_graph=True)
        others = torch.cat([gz[0, :i], gz[0, i + 1 :]])
        assert gz[0, i].abs().sum() > 0 and others.abs().sum() == 0
        assert gx[0, i:].abs().sum() == 0
        if i > 0:
            assert gx[0, :i].abs().sum() > 0


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_ar_kv_cached_decoding_equals_the_training_forward(positions):
    cfg, block = _ar_block(positions=positions)
    t, d = cfg.seq_len, cfg.dim
    x = torch.randint(0, 11, (2, t))
    z = torch.randn(2, t, d)
    sigma = torch.full((2,), 0.7)
    with torch.no_grad():
        d_full, logits_full = block(x, z, sigma)
        bb = block.denoiser.backbone
        caches = None
        for i in range(t):  # grow the clean prefix one token at a time (prompt of 1, then decoding)
            d_i, logits_i, _ = block.decode_step(z[:, i], 0.7, i, caches)
            torch.testing.assert_close(d_i, d_full[:, i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits_i, logits_full[:, i], atol=1e-5, rtol=1e-5)
            caches = bb.extend(x[:, i : i + 1], i, caches)
        prefill = bb.extend(x[:, :5], 0, None)  # a whole prompt at once gives the same cache
        d_5, _, same = block.decode_step(z[:, 5], 0.7, 5, prefill)
        torch.testing.assert_close(d_5, d_full[:, 5], atol=1e-5, rtol=1e-5)
        assert same is prefill
        # fused: token 5 enters the cache in the pass that denoises position 6
        d_6, _, fused = block.decode_step(z[:, 6], 0.7, 6, prefill, x[:, 5:6])
        torch.testing.assert_close(d_6, d_full[:, 6], atol=1e-5, rtol=1e-5)
        for (k1, v1), (k2, v2) in zip(fused, bb.extend(x[:, :6], 0, None), strict=True):
            torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
        # all noisy rows at once after the whole window's clean caches (the ancestral likelihood's path)
        rows = block.noisy_logits(z, 0.7, bb.extend(x, 0, None))
        torch.testing.assert_close(rows, logits_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_ar_baseline_kv_cache_equals_its_causal_forward(positions):
    torch.manual_seed(0)
    cfg = arlm_tiny(positions=positions)
    model = ARBaseline(cfg, _tokenizer("abcdefghijk")).eval()
    x = torch.randint(0, 11, (2, cfg.seq_len))
    with torch.no_grad():
        full = model(x)  # (2, T, V)
        logits, caches = model.extend(x[:, :3], 0, None)
        torch.testing.assert_close(logits, full[:, 2], atol=1e-5, rtol=1e-5)
        for i in range(3, cfg.seq_len):
            logits, caches = model.extend(x[:, i : i + 1], i, caches)
            torch.testing.assert_close(logits, full[:, i], atol=1e-5, rtol=1e-5)


def test_adaln_per_segment_equals_per_token_conditioning():
    from dbcore.models.layers import AdaLNLayer

    torch.manual_seed(0)
    layer = AdaLNLayer(16, 2, gate_init=1.0)
    for p in layer.parameters():
        p.data.normal_(0, 0.3)
    h = torch.randn(3, 10, 16, requires_grad=True)
    c = torch.randn(3, 2, 16)
    mask = ar_mask(5)
    seg = layer(h, c, mask)
    tok = layer(h, c.repeat_interleave(5, dim=1), mask)
    torch.testing.assert_close(seg, tok, atol=1e-5, rtol=1e-5)
    g_seg = torch.autograd.grad(seg.square().sum(), [h, *layer.parameters()])
    g_tok = torch.autograd.grad(tok.square().sum(), [h, *layer.parameters()])
    for a, b in zip(g_seg, g_tok, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- MDLM masking and ELBO


def test_mdlm_slices_cover_time_with_block0_highest():
    assert time_slice(0, 3) == (2 / 3, 1.0) and time_slice(2, 3) == (0.0, 1 / 3)
    t = torch.tensor([0.0, 0.5, 1.0])
    e = 1e-4
    assert torch.allclose(mask_probability(t, e), torch.tensor([e, 0.5, 1 - e]))
    # w(t) = -alpha'(t) / (1 - alpha(t)) for alpha = (1 - 2e)(1 - t) + e
    assert torch.allclose(elbo_weight(t, e), (1 - 2 * e) / mask_probability(t, e))


def test_mdlm_noise_draws_t_in_the_block_slice_and_masks_at_its_rate(tmp_path):
    cfg = config_mod.load(_cfg(tmp_path, "mdlm", "stratified = true"))
    recipe = for_config(cfg)
    from dbcore.method import rng
    from dbcore.method.batch import INDEX, UNIFORMS

    n, t = 512, cfg.model.seq_len
    x = torch.randint(0, 20, (n, t))
    idx = torch.arange(n)
    for b in range(2):
        u = rng.uniforms_of(idx, 1 + t, 0, b, 0).numpy()
        noised = recipe.noise({INDEX: idx.numpy(), UNIFORMS: u}, x, b, 0, recipe.sigma_law(b), 0)
        lo, hi = time_slice(b, 2)
        assert noised.sigma.min() >= lo and noised.sigma.max() <= hi
        gaps = noised.sigma.sort().values.diff()  # stratified: one draw per 1/n of the slice
        assert gaps.max() <= (hi - lo) * 2.0 / n
        masked = noised.z == MASK
        assert torch.equal(noised.z[~masked], x[~masked])
        rate = masked.float().mean(1)
        expect = mask_probability(noised.sigma, 1e-4)
        assert abs(float((rate - expect).mean())) < 0.02


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("recipe", ["mdlm", "arlm"])
def test_lm_cache_train_eval_sample_both_kinds(tmp_path, text, recipe):
    extra = "sample_steps = 4" if recipe == "mdlm" else ""
    cfg = config_mod.load(_cfg(tmp_path, recipe, extra))
    s = write_cache(cfg, load_source(f"text:{text}"), tmp_path / "c.zarr", progress=False)
    assert s.read(layout.TOKENS).shape == (len(TEXT),) and s.read(layout.TOKENS).dtype == np.uint16
    vocab = tokenizer_of({layout.TOKENIZER: torch.from_numpy(s.read(layout.TOKENIZER))}).vocab.chars
    assert vocab == "".join(sorted(set(TEXT)))
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "blocks", progress=False)
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "e2e", e2e=True, progress=False)
    valid = tmp_path / "valid.txt"
    valid.write_text(TEXT[:400])
    for run in (tmp_path / "blocks", tmp_path / "e2e"):
        r = evaluate(run, f"text:{valid}", num_samples=8)
        assert r["num_windows"] == 8 and 0 < r["bpc"] < 10 and r["bpc_stderr"] > 0
        texts = sample_text_run(run, {"num": 2, "length": 12, "prompt": "To"})
        assert len(texts) == 2 and all(len(x) == 12 and x.startswith("To") for x in texts)
        assert set("".join(texts)) <= set(vocab)
    if recipe == "arlm":  # the token-ancestral chain, by eval and sample alike
        r = evaluate(tmp_path / "blocks", f"text:{valid}", num_samples=4, sampler="ancestral")
        assert r["sampler"] == "ancestral" and r["eval_draws"] == 1 and 0 < r["bpc"] < 10
        assert (r["estimator"], r["eval_head"], r["eval_tail"]) == ("stratified", 2, 2)
        assert [p["block"] for p in r["per_block"]] == [0, 1]
        exact = evaluate(tmp_path / "blocks", f"text:{valid}", num_samples=4, sampler="ancestral", exact=True)
        assert (exact["estimator"], exact["eval_head"]) == ("exact", None) and 0 < exact["bpc"] < 10
        texts = sample_text_run(tmp_path / "blocks", {"num": 2, "length": 12, "prompt": "To",
                                                      "sampler": "ancestral"})
        assert all(len(x) == 12 and x.startswith("To") for x in texts)
        with pytest.raises(ValueError, match="decode='product'"):
            evaluate(tmp_path / "blocks", f"text:{valid}", decode="product", sampler="ancestral")


@pytest.mark.parametrize("recipe", ["mdlm", "arlm"])
def test_lm_resume_is_bit_identical(tmp_path, text, recipe, interrupted_at_step):
    cfg = config_mod.load(_cfg(tmp_path, recipe, "sample_steps = 4"))
    write_cache(cfg, load_source(f"text:{text}"), tmp_path / "c.zarr", progress=False)
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "full", block=1, progress=False)
    with interrupted_at_step(8):
        train_run(cfg, tmp_path / "c.zarr", tmp_path / "crash", block=1, progress=False)
    train_run(cfg, tmp_path / "c.zarr", tmp_path / "crash", block=1, progress=False)
    a, _ = checkpoint.load(tmp_path / "full/block1", prefix="model.")
    b, _ = checkpoint.load(tmp_path / "crash/block1", prefix="model.")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lm_bad_input_is_one_clear_line(tmp_path, text):
    cfg_path = _cfg(tmp_path, "arlm")
    runner = CliRunner()

    def cache(data, out="c.zarr"):
        return runner.invoke(main, ["cache", str(cfg_path), "--data", data, "--out", str(tmp_path / out)])

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    for data, words in ((f"text:{empty}", "empty"), (f"text:{binary}", "binary"),
                        (f"text:{short}", "fewer than seq_len 16"), ("digits", "needs a text source"),
                        (f"text:{text}", None)):
        r = cache(data)
        if words is None:
            assert r.exit_code == 0, r.output
            continue
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(main, ["cache", str(cfg_path), "--data", f"text:{text}", "--out",
                             str(tmp_path / "n.zarr"), "--noise", "cached"])
    assert r.exit_code == 1 and "online only" in r.output
    r = runner.invoke(main, ["train", str(cfg_path), "--store", str(tmp_path / "c.zarr"), "--out",
                             str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["sample", str(tmp_path / "run"), "--prompt", "Zürich", "--length", "12"])
    assert r.exit_code == 1 and "not in the vocabulary" in r.output and "--prompt" in r.output
    r = runner.invoke(main, ["sample", str(tmp_path / "run"), "--prompt", "To", "--length", "2"])
    assert r.exit_code == 1 and "--length 2 must be more than the prompt's 2 tokens" in r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "run"), "--data", f"text:{binary}", "--json"])
    assert r.exit_code == 1 and "binary" in r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "run"), "--data", f"text:{text}", "--json",
                             "--num-samples", "4"])
    assert r.exit_code == 0 and {"bpc", "num_tokens"} <= set(json.loads(r.output))


def test_mdlm_elbo_of_a_uniform_predictor_is_log2_v(tmp_path, text):
    """Fresh models predict uniformly (zero-initialised head): the ELBO estimator must then give
    (1 - 2e) log2 V bits per character, with both the chain of blocks and a single model."""
    import math

    cfg = config_mod.load(_cfg(tmp_path, "mdlm", "eval_draws = 2"))
    recipe = for_config(cfg)
    chars = "".join(sorted(set(TEXT)))
    frozen = {layout.TOKENIZER: _tokenizer(chars)}
    blocks = [recipe.build_block(b, frozen) for b in range(2)]
    expect = (1 - 2 * cfg.model.mask_eps) * math.log2(len(chars))
    for load_block, e2e in ((lambda b: blocks[b], None), (None, recipe.build_e2e(frozen))):
        r = recipe.evaluate(load_block, e2e, load_text(f"text:{text}", char_tokenizer(chars)), Options())
        assert abs(r["bpc"] - expect) < 4 * r["bpc_stderr"] + 1e-3, (r["bpc"], expect, r["bpc_stderr"])
        assert sum(p["bits_per_token"] for p in r["per_block"]) == pytest.approx(r["bpc"], abs=1e-4)


def test_rotary_attention_depends_on_relative_positions_only():
    from dbcore.models.layers import Attention

    torch.manual_seed(0)
    attn = Attention(16, 2, rope=True)
    h = torch.randn(2, 7, 16)
    pos = torch.arange(7)
    torch.testing.assert_close(attn.mix(h, pos=pos), attn.mix(h, pos=pos + 11), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(attn.mix(h, pos=pos), attn.mix(h, pos=pos.flip(0)), atol=1e-3)


def test_ar_token_mixing_keeps_labels_mixes_a_share_and_is_reproducible():
    from dbcore.method.noise import mix_token_targets

    emb = make_target_embedding(11, 8, 0)
    x = torch.randint(0, 11, (64, 16))
    idx = torch.arange(64)
    a = mix_token_targets(emb, x, idx, 0, 1, 2, 0.5)
    assert torch.equal(a, mix_token_targets(emb, x, idx, 0, 1, 2, 0.5))
    pure = (a - emb[x]).abs().sum(-1) < 1e-6
    assert 0.4 < 1 - pure.float().mean() < 0.6  # about half the positions are blends
    assert torch.equal(mix_token_targets(emb, x, idx, 0, 1, 2, 0.0), emb[x])
    assert not torch.equal(a, mix_token_targets(emb, x, idx, 0, 1, 3, 0.5))  # new draw, new blends


def test_ar_ancestral_likelihood_is_the_distribution_generation_samples(tmp_path, text):
    """The token-ancestral chain, two implementations: its exact-over-tokens likelihood
    (`ancestral_probs`, batched windows) and KV-cached generation (one token at a time) must give
    the same distribution of the next token, and the later blocks must change it."""
    cfg = config_mod.load(_cfg(tmp_path, "arlm", "sample_steps = 3\nsampler = \"ancestral\""))
    recipe = for_config(cfg)
    vocab = torch.tensor(sorted({ord(ch) for ch in TEXT}))
    torch.manual_seed(0)
    frozen = {layout.TOKENIZER: _tokenizer("".join(sorted(set(TEXT)))),
              layout.TARGET_EMBEDDING: make_target_embedding(len(vocab), 32, 0, 1.0)}
    blocks = [recipe.build_block(b, frozen) for b in range(2)]
    with torch.no_grad():
        for block in blocks:  # a fresh block has D = c_skip z: give its readout and F some shape
            block.head.weight.mul_(12.0)
            block.denoiser.backbone.final.linear.weight.normal_(0, 0.3)
    prompt = TEXT[:9]
    ids = torch.tensor([[int((vocab == ord(ch)).nonzero()) for ch in TEXT[:16]]])  # (1, 16)
    p, _ = recipe.ancestral_probs(lambda b: blocks[b], ids, 3, draws=256)
    expect = p[0, len(prompt)]  # (V,): token 9 given the true prefix
    texts = recipe.sample_text(lambda b: blocks[b], None, Options(num=8000, length=len(prompt) + 1,
                                                                  prompt=prompt, seed=1))
    seen = torch.tensor([int((vocab == ord(t[-1])).nonzero()) for t in texts])
    freq = torch.bincount(seen, minlength=len(vocab)).double() / len(texts)
    noise = LevelNoise(torch.arange(1), (16, 32), 0, 2, 0, 64, len(vocab), torch.device("cpu"))
    with torch.no_grad():
        level0 = _level_probs(blocks[0], ids, SIGMA_MAX, noise, None)[0, len(prompt)]  # block 0 alone

    def tv(a, b):
        return 0.5 * float((a.double() - b.double()).abs().sum())

    assert tv(freq, expect) < 0.04, (tv(freq, expect), tv(level0, expect))
    assert tv(level0, expect) > 0.1 and tv(freq, level0) > 0.1  # the later levels matter
