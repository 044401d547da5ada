import torch

from dbcore.layers import AdaLNLayer, modulate


def test_recomputed_norm_modulate_gives_the_plain_gradients():
    torch.manual_seed(0)
    layer = AdaLNLayer(16, 2, 2.0)
    torch.nn.init.normal_(layer.modulation[1].weight, std=0.1)  # non-trivial shift/scale/gate
    h = torch.randn(3, 5, 16, requires_grad=True)
    c = torch.randn(3, 16)

    def plain(h, c):
        s1, sc1, g1, s2, sc2, g2 = layer.modulation(c).chunk(6, dim=-1)
        h = h + g1[:, None] * layer.attn(modulate(layer.norm1(h), s1, sc1))
        return h + g2[:, None] * layer.mlp(modulate(layer.norm2(h), s2, sc2))

    out = layer(h, c)
    grads = torch.autograd.grad(out.square().sum(), [h, *layer.parameters()])
    ref = plain(h, c)
    ref_grads = torch.autograd.grad(ref.square().sum(), [h, *layer.parameters()])
    assert torch.allclose(out, ref)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref_grads, strict=True))
