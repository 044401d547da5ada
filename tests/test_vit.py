import pytest
import torch
from sklearn.datasets import load_digits

from dbcore import config as config_mod
from dbcore.method.batch import Noised
from dbcore.method.edm import add_noise, precond
from dbcore.method.loss import sample_weights, weighted_ce
from dbcore.models.layers import AdaLNLayer, checkpoint_layers
from dbcore.recipes import for_config, vit
from dbcore.recipes.vit import (
    ViTBlock,
    ViTClassifier,
    ViTConfig,
    block_layers,
    images_to_float,
    layers_in_block,
    make_target_embedding,
    patch_tokens,
    vit_cifar,
    vit_mnist,
    vit_tiny,
)
from dbcore.runs.memory import _SavedBytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _block(cfg, b, seed=0):
    torch.manual_seed(seed)
    return ViTBlock(cfg, b, make_target_embedding(cfg.num_classes, cfg.dim, 0, cfg.target_scale))


def test_factories():
    assert (vit_tiny().image_size, vit_mnist().patch_size, vit_cifar().num_classes) == (8, 7, 100)
    assert block_layers(vit_cifar()) == [4, 4, 4]
    assert vit_tiny(num_blocks=4).num_blocks == 4


def test_layer_split():
    with pytest.raises(ValueError, match="layer_split"):
        ViTConfig(depth=5, num_blocks=2)
    cfg = ViTConfig(depth=5, num_blocks=2, layer_split=[3, 2])
    assert [layers_in_block(cfg, b) for b in range(2)] == [3, 2]
    for bad in ([4, 2], [5], [5, 0]):
        with pytest.raises(ValueError):
            ViTConfig(depth=5, num_blocks=2, layer_split=bad)
    with pytest.raises(ValueError):
        ViTConfig(sigma_dist="uniform")


def test_target_embedding():
    e = make_target_embedding(10, 64, seed=3)
    assert e.shape == (10, 64) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(10))
    assert torch.equal(e, make_target_embedding(10, 64, seed=3))
    assert not torch.equal(e, make_target_embedding(10, 64, seed=4))
    norms = make_target_embedding(10, 64, 3, scale=2.5).norm(dim=1)
    assert torch.allclose(norms, torch.full((10,), 2.5))


def test_blocks_own_their_parameters():
    cfg = vit_tiny(num_blocks=2)
    b0, b1 = _block(cfg, 0), _block(cfg, 1)
    ids0 = {id(p) for p in b0.parameters()}
    assert not ids0 & {id(p) for p in b1.parameters()}
    n0, n1 = (sum(p.numel() for p in b.parameters()) for b in (b0, b1))
    assert n0 == n1
    assert "target_embedding" in dict(b0.named_buffers())
    assert "target_embedding" not in dict(b0.named_parameters())
    assert "target_embedding" in b0.state_dict()


def test_block_builds_only_its_layers(monkeypatch):
    built = []

    class Counting(AdaLNLayer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(vit, "AdaLNLayer", Counting)
    cfg = vit_tiny(depth=7, num_blocks=4, layer_split=[2, 1, 1, 3])
    block = _block(cfg, 3)
    assert len(built) == 3 and len(block.layers) == 3


def test_fresh_adaln_layer_is_identity():
    layer = AdaLNLayer(32, 4)
    h, c = torch.randn(3, 5, 32), torch.randn(3, 32)
    assert torch.equal(layer(h, c), h)


def test_forward_shapes_and_fresh_denoiser():
    cfg = vit_tiny()
    block = _block(cfg, 0)
    x, z = torch.rand(5, 1, 8, 8), torch.randn(5, cfg.dim)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0])
    d, logits = block(x, z, sigma)
    assert d.shape == (5, cfg.dim) and logits.shape == (5, 10)
    # F is zero-initialised: a fresh block is D = c_skip * z, sigma broadcast per sample
    assert torch.allclose(d, precond(sigma).c_skip[:, None] * z)
    d_scalar, _ = block(x, z, torch.tensor(0.5))
    assert torch.allclose(d_scalar, precond(torch.tensor(0.5)).c_skip * z)


def test_per_sample_sigma_matches_single_samples():
    cfg = vit_tiny()
    block = _block(cfg, 1)
    for p in block.parameters():  # leave the zero init so every path matters
        torch.nn.init.normal_(p, std=0.05)
    x, z = torch.rand(3, 1, 8, 8), torch.randn(3, cfg.dim)
    sigma = torch.tensor([0.05, 0.5, 5.0])
    d, logits = block(x, z, sigma)
    for i in range(3):
        di, li = block(x[i : i + 1], z[i : i + 1], sigma[i : i + 1])
        assert torch.allclose(d[i], di[0], atol=1e-5)
        assert torch.allclose(logits[i], li[0], atol=1e-5)


def noised_target(emb, labels, sigma, eps):
    return add_noise(emb[labels], sigma, eps)


def _recipe(**model):
    return for_config(config_mod.from_dict({"model": {"recipe": "vit", **model}}, "test.toml"))


def test_block_loss_is_weighted_per_sample():
    recipe = _recipe()
    cfg = recipe.model_cfg
    block = _block(cfg, 0)
    images, labels = torch.randint(0, 256, (4, 8, 8, 1), dtype=torch.uint8), torch.tensor([0, 3, 5, 9])
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0])
    z = noised_target(block.target_embedding, labels, sigma, torch.randn(4, cfg.dim))
    _, logits = block(vit.images_to_float(images), z, sigma)
    w = sample_weights(sigma, "edm")
    expected = weighted_ce(logits, labels, w)
    got = recipe.block_loss(block, {"images": images, "labels": labels}, Noised(z, sigma), w)
    assert torch.allclose(got, expected)


def _digits(n):
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x[:n] * 255 / 16).round().to(torch.uint8).view(n, 8, 8, 1)
    return images, torch.tensor(y[:n])


def test_block_overfits_digits_batch():
    images, y = _digits(64)
    recipe = _recipe()
    cfg = recipe.model_cfg
    block = _block(cfg, 1)
    opt = torch.optim.AdamW(block.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    sigma = torch.full((64,), 1.0)  # |eps| = 8 >> |y| = 1: the label must come from the image
    batch = {"images": images, "labels": y}
    for _ in range(60):
        z = noised_target(block.target_embedding, y, sigma, torch.randn(64, cfg.dim, generator=g))
        loss = recipe.block_loss(block, batch, Noised(z, sigma), torch.ones(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = noised_target(block.target_embedding, y, sigma, torch.randn(64, cfg.dim, generator=g))
    with torch.no_grad():
        acc = (block(vit.images_to_float(images), z, sigma)[1].argmax(1) == y).float().mean()
    assert loss.item() < 0.6 and acc > 0.9


def test_classifier_and_checkpointing():
    cfg = vit_tiny()
    torch.manual_seed(0)
    plain = ViTClassifier(cfg)
    ckpt = checkpoint_layers(ViTClassifier(cfg), chunks=4)
    ckpt.load_state_dict(plain.state_dict())
    assert len(plain.layers) == cfg.depth
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    grads = []
    for m in (plain, ckpt):
        m.train()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert plain(x).shape == (6, 10)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_patch_tokens_from_uint8_images_keep_the_images_not_a_float_copy():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 4, stride=4)
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    tokens = {}
    for name, x in (("float", images_to_float(images)), ("uint8", images)):
        saved = _SavedBytes()
        with saved.hooks():
            out = patch_tokens(conv, x)
        grads = torch.autograd.grad(out.square().sum(), list(conv.parameters()))
        tokens[name] = (out, grads, saved.total())
    (f_out, f_grads, f_saved), (u_out, u_grads, u_saved) = tokens["float"], tokens["uint8"]
    assert u_out.shape == (5, 16, 16) and torch.allclose(u_out, f_out)
    assert all(torch.allclose(a, b) for a, b in zip(u_grads, f_grads, strict=True))
    assert u_saved <= images.numel() < f_saved  # the uint8 images (1 byte a pixel), not 4 bytes a pixel
    with torch.no_grad():
        assert torch.allclose(patch_tokens(conv, images), f_out)
