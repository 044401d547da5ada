import pytest
import torch
import torch.nn.functional as F

from dbcore.models.layers import (
    LN_EPS,
    AdaLNFinal,
    AdaLNLayer,
    NoiseEmbedder,
    PreLNLayer,
    _GatedResidual,
    _NormModulate,
    checkpoint_layers,
    checkpointed,
    modulate,
)
from dbcore.runs.memory import _SavedBytes


def _plain_layer(layer: AdaLNLayer, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The DiT layer written with plain autograd ops (every intermediate saved)."""
    s1, sc1, g1, s2, sc2, g2 = layer.modulation(c).chunk(6, dim=-1)
    h = h + g1[:, None] * layer.attn(modulate(F.layer_norm(h, (h.shape[-1],), eps=LN_EPS), s1, sc1))
    return h + g2[:, None] * layer.mlp(modulate(F.layer_norm(h, (h.shape[-1],), eps=LN_EPS), s2, sc2))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while fn runs."""
    saved = _SavedBytes()
    with saved.hooks():
        fn()
    return saved.total()


def test_memory_lean_layer_gives_the_plain_values_and_gradients():
    torch.manual_seed(0)
    layer = AdaLNLayer(16, 2, 2.0)
    torch.nn.init.normal_(layer.modulation[1].weight, std=0.1)  # non-trivial shift/scale/gate
    h = torch.randn(3, 5, 16, requires_grad=True)
    c = torch.randn(3, 16, requires_grad=True)
    wrt = [h, c, *layer.parameters()]
    out = layer(h, c)
    grads = torch.autograd.grad(out.square().sum(), wrt)
    ref = _plain_layer(layer, h, c)
    ref_grads = torch.autograd.grad(ref.square().sum(), wrt)
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads, strict=True))
    with torch.no_grad():
        assert torch.allclose(layer(h, c), ref, atol=1e-6)


def test_fused_functions_pass_gradcheck():
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    assert torch.autograd.gradcheck(
        lambda h, s, sc: _NormModulate.apply(h, s, sc, 1e-6), (rand(3, 5, 8), rand(3, 8), rand(3, 8))
    )
    assert torch.autograd.gradcheck(
        _GatedResidual.apply, (rand(3, 5, 8), rand(3, 8), rand(3, 5, 6), rand(8, 6), rand(8))
    )


def test_gated_layer_saves_no_more_than_a_plain_layer_plus_the_modulation():
    """Bytes saved for backward: the adaLN layer keeps what a pre-LN layer keeps (the gates' branch
    outputs and the normalised copies are rebuilt in backward)."""
    n, t, d = 8, 17, 32
    h = torch.randn(n, t, d, requires_grad=True)
    c = torch.randn(n, d)
    ada, pre = AdaLNLayer(d, 4, 2.0), PreLNLayer(d, 4, 2.0)
    per_token = n * t * d * 4  # one (N, T, d) float32 tensor
    extra = _saved_bytes(lambda: ada(h, c)) - _saved_bytes(lambda: pre(h))
    assert extra < per_token / 2, extra / per_token


def test_adaln_single_projects_a_rank_r_noise_embedding_in_every_layer():
    from dbcore.recipes.vit import ViTBlock, ViTConfig

    layer = AdaLNLayer(8, 2, 2.0, gate_init=1.0, cond_dim=4)
    final = AdaLNFinal(8, 8, cond_dim=4)
    c = NoiseEmbedder(4, hidden=False)(torch.tensor([0.1, -0.5]))
    assert c.shape == (2, 4)
    mod = layer.modulation(c)
    assert mod.shape == (2, 48) and final.modulation(c).shape == (2, 16)
    # zero-initialised: shift/scale 0, gates = gate_init, at any noise level
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
    assert torch.all(gate1 == 1) and torch.all(gate2 == 1) and torch.all(shift1 == 0)
    assert torch.all(final.modulation(c) == 0)
    emb = torch.nn.functional.normalize(torch.randn(10, 32), dim=-1)
    blocks = {c: ViTBlock(ViTConfig(dim=32, depth=4, heads=2, num_blocks=2, conditioning=c), 0, emb)
              for c in ("adaln", "adaln-single")}
    sizes = {c: sum(p.numel() for p in b.parameters()) for c, b in blocks.items()}
    assert sizes["adaln-single"] < sizes["adaln"]
    x, z = torch.rand(4, 1, 8, 8), torch.randn(4, 32)
    for b in blocks.values():  # a fresh block is D = c_skip z either way, and trains end to end
        d_hat, logits = b(x, z, torch.full((4,), 0.5))
        torch.testing.assert_close(d_hat, z * 0.25 / (0.25 + 0.25))
        logits.sum().backward()
    with pytest.raises(ValueError, match="conditioning"):
        ViTConfig(conditioning="film")
    with pytest.raises(ValueError, match="modulation_rank"):
        ViTConfig(conditioning="adaln-single", modulation_rank=0)


def _grads(out: torch.Tensor, wrt: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out.square().sum(), wrt)


def test_forward_rows_equals_the_full_layer_at_those_rows():
    """Only `rows` get queries and an MLP, yet values and gradients equal the full layer's rows:
    adaLN per sample and per token, a mask, rotary positions; and the plain pre-LN layer."""
    torch.manual_seed(0)
    n, t, d = 3, 7, 16
    h = torch.randn(n, t, d, requires_grad=True)
    mask = torch.rand(t, t) > 0.3
    mask |= torch.eye(t, dtype=torch.bool)
    for rows in (slice(0, 1), slice(2, 5), slice(4, 7)):
        for rope in (False, True):
            layer = AdaLNLayer(d, 2, 2.0, rope=rope)
            torch.nn.init.normal_(layer.modulation[1].weight, std=0.1)
            for c in (torch.randn(n, d, requires_grad=True), torch.randn(n, t, d, requires_grad=True)):
                wrt = [h, c, *layer.parameters()]
                full = layer(h, c, mask)[:, rows]
                part = layer.forward_rows(h, c, rows, mask[rows])
                assert part.shape == full.shape
                assert torch.allclose(part, full, atol=1e-6)
                assert all(torch.allclose(a, b, atol=1e-5)
                           for a, b in zip(_grads(part, wrt), _grads(full, wrt), strict=True))
            pre = PreLNLayer(d, 2, 2.0, rope=rope)
            wrt = [h, *pre.parameters()]
            full, part = pre(h, mask)[:, rows], pre.forward_rows(h, rows, mask[rows])
            assert torch.allclose(part, full, atol=1e-6)
            assert all(torch.allclose(a, b, atol=1e-5)
                       for a, b in zip(_grads(part, wrt), _grads(full, wrt), strict=True))


def test_forward_rows_saves_a_fraction_of_the_full_layer():
    n, t, d = 8, 33, 32
    h = torch.randn(n, t, d, requires_grad=True)
    c = torch.randn(n, d)
    ada, pre = AdaLNLayer(d, 4, 2.0), PreLNLayer(d, 4, 2.0)
    cls = slice(0, 1)
    # keys and values of every row stay (the input and k, v: about 3 of a full layer's ~10 (N, T, d))
    assert _saved_bytes(lambda: ada.forward_rows(h, c, cls)) < 0.45 * _saved_bytes(lambda: ada(h, c))
    assert _saved_bytes(lambda: pre.forward_rows(h, cls)) < 0.45 * _saved_bytes(lambda: pre(h))


def test_forward_rows_with_per_segment_conditioning_takes_whole_segments():
    torch.manual_seed(1)
    n, t, d = 2, 8, 16
    layer = AdaLNLayer(d, 2, 2.0, rope=True)
    torch.nn.init.normal_(layer.modulation[1].weight, std=0.1)
    h = torch.randn(n, t, d, requires_grad=True)
    c = torch.randn(n, 2, d, requires_grad=True)  # one adaLN input per half, as the AR block
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    pos = torch.cat([torch.arange(4), torch.arange(4)])
    wrt = [h, c, *layer.parameters()]
    for rows in (slice(4, 8), slice(0, 4), slice(0, 8)):
        full = layer(h, c, mask, pos)[:, rows]
        part = layer.forward_rows(h, c, rows, mask[rows], pos)
        assert torch.allclose(part, full, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-5)
                   for a, b in zip(_grads(part, wrt), _grads(full, wrt), strict=True))
    with pytest.raises(ValueError, match="whole segments"):
        layer.forward_rows(h, c, slice(2, 6), mask[2:6], pos)


@pytest.mark.parametrize("chunks", [1, 2, 3, 9])
def test_checkpointed_slices_of_the_batch_give_the_whole_batch_values_and_gradients(chunks):
    """Recomputing a layer over slices of the batch (5 samples into 1, 2, 3 or, capped, 5 slices):
    the same values and gradients, whatever the conditioning, mask or method."""
    torch.manual_seed(2)
    n, t, d = 5, 6, 16
    layer = AdaLNLayer(d, 2, 2.0, rope=True)
    torch.nn.init.normal_(layer.modulation[1].weight, std=0.1)
    h = torch.randn(n, t, d, requires_grad=True)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    per_sample_mask = (torch.rand(n, 1, t, t) > 0.3) | torch.eye(t, dtype=torch.bool)
    pos = torch.arange(t).flip(0)
    cases = [
        (layer.forward, (h, torch.randn(n, d, requires_grad=True)), {}),  # per sample
        (layer.forward, (h, torch.randn(n, t, d, requires_grad=True), causal), {"pos": pos}),  # per token
        (layer.forward, (h, torch.randn(n, 2, d, requires_grad=True), per_sample_mask), {}),  # per segment
        (layer.forward_rows, (h, torch.randn(n, d, requires_grad=True), slice(0, 1)), {}),
    ]
    for fn, args, kwargs in cases:
        wrt = [h, args[1], *layer.parameters()]
        full = fn(*args, **kwargs)
        part = checkpointed(fn, *args, chunks=chunks, **kwargs)
        assert torch.allclose(part, full, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-5)
                   for a, b in zip(_grads(part, wrt), _grads(full, wrt), strict=True))
    # a (T, T) mask is shared by the batch even when T equals the batch size
    square = torch.randn(t, t, d, requires_grad=True)
    causal_square = torch.ones(t, t, dtype=torch.bool).tril()
    c = torch.randn(t, d)
    full = layer(square, c, causal_square)
    part = checkpointed(layer.forward, square, c, causal_square, chunks=chunks)
    assert torch.allclose(part, full, atol=1e-6)
    # decoding layers return (out, (keys, values)): each joined along the batch
    pre = PreLNLayer(d, 2, 2.0)
    full_out, (full_k, _) = pre.step(h, None)
    out, (k, _) = checkpointed(pre.step, h, None, chunks=chunks)
    assert torch.allclose(out, full_out, atol=1e-6) and torch.allclose(k, full_k, atol=1e-6)
    # after a cached prefix (keys, values), which is sliced with the batch
    past = (torch.randn(n, 2, 3, d // 2), torch.randn(n, 2, 3, d // 2))
    pos = torch.arange(3, 3 + t)
    full_out, _ = pre.step(h, past, pos)
    out, (k, v) = checkpointed(pre.step, h, past, pos, chunks=chunks)
    assert torch.allclose(out, full_out, atol=1e-6) and k.shape == (n, 2, t, d // 2)


def test_checkpoint_layers_keeps_only_each_layers_input():
    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(PreLNLayer(32, 4, 4.0) for _ in range(2))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                h = layer(h)
            return h

    h = torch.randn(16, 20, 32, requires_grad=True)
    for chunks in (1, 4):
        model = checkpoint_layers(Stack(), chunks)
        assert _saved_bytes(lambda m=model: m(h)) == 2 * h.numel() * 4  # the two layers' inputs
    with pytest.raises(ValueError, match="chunks"):
        checkpoint_layers(Stack(), 0)


def test_consecutive_checkpointed_layers_pass_slices_not_the_joined_batch():
    """The second layer takes the first one's slice outputs: in backward each slice's gradient goes
    from one layer to the other, and the joined output (which the caller sees) gets none."""
    layers = [PreLNLayer(16, 2, 2.0) for _ in range(2)]
    h = torch.randn(12, 5, 16, requires_grad=True)
    seen = []
    mid = checkpointed(layers[0], h, chunks=4)
    mid.register_hook(lambda g: seen.append(g))
    out = checkpointed(layers[1], mid, chunks=4)
    want = _grads(layers[1](layers[0](h)), [h, *layers[0].parameters()])
    got = _grads(out, [h, *layers[0].parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert seen == []
    # sliced differently, the next layer splits the joined batch as any other input
    mid = checkpointed(layers[0], h, chunks=4)
    mid.register_hook(lambda g: seen.append(g))
    _grads(checkpointed(layers[1], mid, chunks=3), [h])
    assert len(seen) == 1


@pytest.mark.parametrize("conditioning", ["adaln", "adaln-single"])
def test_a_checkpointed_vit_layer_keeps_its_input_and_nothing_per_layer_of_the_conditioning(conditioning):
    """Each layer projects the block's one noise embedding inside its checkpointed forward: a layer
    more costs one (N, T, d) input, no (N, 6d) modulation of its own."""
    from dbcore.recipes.vit import ViTBlock, ViTConfig

    n, d = 8, 32
    emb = F.normalize(torch.randn(10, d), dim=-1)
    x, z, sigma = torch.rand(n, 1, 8, 8), torch.randn(n, d), torch.full((n,), 0.5)
    saved = {}
    for depth in (2, 4):
        cfg = ViTConfig(image_size=8, patch_size=2, dim=d, depth=depth, heads=2, num_blocks=1,
                        conditioning=conditioning, modulation_rank=4)
        block = checkpoint_layers(ViTBlock(cfg, 0, emb), chunks=2)
        saved[depth] = _saved_bytes(lambda b=block: b(x, z, sigma)[1])
    tokens = (8 // 2) ** 2 + 1  # patches and the noisy target's token
    assert saved[4] - saved[2] == 2 * n * tokens * d * 4
