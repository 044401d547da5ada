import pytest
import torch

from dbcore.method.edm import precond
from dbcore.method.loss import sample_weights, weighted_mse
from dbcore.method.partition import layers_in_block
from dbcore.models.dit import (
    DiTBlock,
    DiTConfig,
    DiTModel,
    LabelEmbedder,
    dit_mnist,
    dit_tiny,
    drop_labels,
    patchify,
    unpatchify,
)
from dbcore.models.layers import AdaLNLayer, checkpoint_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(cfg, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    sigma = torch.exp(torch.randn(n, generator=g) * 1.2 - 1.2)
    z = y + sigma[:, None, None, None] * torch.randn(y.shape, generator=g)
    labels = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)  # the null class included
    labels[0] = cfg.num_classes
    return y, z, sigma, labels


def _loss(model, y, z, sigma, labels):
    return weighted_mse(model(z, sigma, labels), y, sample_weights(sigma, "edm"))


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_config():
    assert (dit_tiny().image_size, dit_mnist().patch_size, dit_mnist().num_blocks) == (8, 4, 3)
    assert dit_mnist().num_patches == 49 and dit_tiny().patch_dim == 4
    for bad in (
        dict(image_size=9), dict(dim=66, heads=3), dict(sigma_dist="nope"), dict(class_drop=1.0),
        dict(class_drop=-0.1), dict(gamma=-1.0), dict(depth=5), dict(layer_split=[3, 2]),
    ):
        with pytest.raises(ValueError):
            DiTConfig(**bad)
    assert DiTConfig(depth=5, layer_split=[3, 2]).layer_split == [3, 2]


@pytest.mark.parametrize("c,h,p", [(1, 8, 2), (3, 12, 4), (2, 28, 7)])
def test_patchify_inverse(c, h, p):
    x = torch.randn(3, c, h, h)
    t = patchify(x, p)
    assert t.shape == (3, (h // p) ** 2, p * p * c)
    assert torch.equal(unpatchify(t, p, c, h, h), x)
    assert torch.equal(patchify(unpatchify(t, p, c, h, h), p), t)
    # token k holds the pixels of grid cell (k // (h/p), k % (h/p))
    assert torch.equal(t[:, h // p + 1, : p * p * c].reshape(3, p, p, c).permute(0, 3, 1, 2),
                       x[:, :, p : 2 * p, p : 2 * p])


def test_shapes():
    cfg = dit_tiny(channels=3, image_size=8, layer_split=[3, 1])
    _, z, sigma, labels = _batch(cfg)
    block = DiTBlock(cfg, 1)
    assert len(block.layers) == 1 and block.layers is block.denoiser.backbone.layers
    assert block(z, sigma, labels).shape == z.shape
    assert block(z, torch.tensor(0.7), labels).shape == z.shape  # a scalar sigma broadcasts
    assert block.forward_with_cfg(z, sigma, labels, 2.0).shape == z.shape
    model = DiTModel(cfg)
    assert len(model.layers) == 4 and model(z, sigma, labels).shape == z.shape
    assert "pos_embed" not in model.state_dict()  # fixed, non-persistent


def test_fresh_block_is_c_skip_z():
    cfg = dit_tiny()
    _, z, sigma, labels = _batch(cfg)
    d = DiTBlock(cfg, 0)(z, sigma, labels)
    assert torch.equal(d, precond(sigma[:, None, None, None]).c_skip * z)


def _trained(model, cfg, steps=3, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    y, z, sigma, labels = _batch(cfg, seed=seed)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, y, z, sigma, labels).backward()
        opt.step()
    return model


def test_forward_with_cfg():
    cfg = dit_tiny()
    torch.manual_seed(0)
    block = _trained(DiTBlock(cfg, 0), cfg).eval()
    _, z, sigma, labels = _batch(cfg, seed=1)
    labels = labels.clamp(max=cfg.num_classes - 1)
    with torch.no_grad():
        d_cond = block(z, sigma, labels)
        d_uncond = block(z, sigma, torch.full_like(labels, cfg.num_classes))
        assert not torch.allclose(d_cond, d_uncond)  # the label matters once trained
        torch.testing.assert_close(block.forward_with_cfg(z, sigma, labels, 1.0), d_cond)
        torch.testing.assert_close(block.forward_with_cfg(z, sigma, labels, 0.0), d_uncond)
        torch.testing.assert_close(
            block.forward_with_cfg(z, sigma, labels, 2.5), d_uncond + 2.5 * (d_cond - d_uncond)
        )


def test_null_class_and_drop_labels():
    emb = LabelEmbedder(10, 16)
    assert emb.table.weight.shape == (11, 16) and emb.null_class == 10
    assert emb(torch.tensor([10])).shape == (1, 16)
    labels = torch.tensor([3, 1, 4, 1, 5])
    mask = torch.tensor([True, False, False, True, False])
    assert drop_labels(labels, mask, 10).tolist() == [10, 1, 4, 10, 5]
    assert labels.tolist() == [3, 1, 4, 1, 5]  # not in place


def test_parameters_per_block():
    cfg = dit_tiny(depth=4, layer_split=[3, 1])
    blocks = [DiTBlock(cfg, b) for b in range(cfg.num_blocks)]
    per_layer = _count(AdaLNLayer(cfg.dim, cfg.heads, cfg.mlp_ratio))
    own = [_count(b) - _count(b.layers) for b in blocks]
    bb = blocks[0].backbone
    embedders = sum(_count(m) for m in (bb.patch_embed, bb.noise_embed, bb.label_embed, bb.final))
    assert own == [embedders, embedders]
    for b, block in enumerate(blocks):
        assert _count(block.layers) == layers_in_block(cfg, b) * per_layer
    assert _count(DiTModel(cfg)) == embedders + cfg.depth * per_layer
    ptrs = [{p.data_ptr() for p in b.parameters()} for b in blocks]
    assert not ptrs[0] & ptrs[1]


def test_gradients_reach_every_parameter():
    cfg = dit_tiny(depth=2, num_blocks=1)
    torch.manual_seed(0)
    block = _trained(DiTBlock(cfg, 0), cfg, steps=3)
    y, z, sigma, labels = _batch(cfg, seed=1)
    block.zero_grad()
    _loss(block, y, z, sigma, labels).backward()
    for name, p in block.named_parameters():
        if name.endswith("label_embed.table.weight"):
            rows = sorted(set(labels.tolist()))
            assert (p.grad[rows].abs().sum(1) > 0).all(), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activation_checkpointing_matches():
    cfg = dit_tiny(depth=3, num_blocks=1)
    y, z, sigma, labels = _batch(cfg)
    models = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = checkpoint_layers(DiTModel(cfg)) if ckpt else DiTModel(cfg)
        m = _trained(model, cfg, steps=2).train()
        m.zero_grad()
        models.append((_loss(m, y, z, sigma, labels), m))
        models[-1][0].backward()
    (l0, m0), (l1, m1) = models
    torch.testing.assert_close(l0, l1, rtol=0, atol=0)
    for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters(), strict=True):
        torch.testing.assert_close(p0.grad, p1.grad, rtol=1e-6, atol=1e-9, msg=n)
