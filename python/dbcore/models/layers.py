"""Transformer layers: DiT-style adaLN layer, noise embedder, plain pre-LN layer (METHOD.md 4).

Every layer maps (N, T, d) -> (N, T, d): blocks are set-to-set maps of width d. Attention takes an
optional boolean mask (True = may attend) and, for decoding, the keys and values of a cached prefix
(`step`). The adaLN conditioning c is per sample (N, d) or per token (N, T, d).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NOISE_FREQ_DIM = 256  # width of the sinusoidal embedding of c_noise
NOISE_MAX_PERIOD = 10_000.0
LN_EPS = 1e-6  # DiT's LayerNorm epsilon
NOISE_SCALE = 1_000.0  # c_noise = ln(s)/4 spans about [-1.6, 1.1]; spread it over the frequencies
ROPE_BASE = 10_000.0  # rotary position embedding (Su et al. 2021): frequencies base^(-k / (dh/2))


def rotary(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x_k, x_{k+dh/2}) of x (N, H, T, dh) by pos (T,) * base^(-k / (dh/2))."""
    half = x.shape[-1] // 2
    freqs = ROPE_BASE ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = pos.to(torch.float32)[:, None] * freqs[None]  # (T, dh/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


KV = tuple[torch.Tensor, torch.Tensor]  # keys and values of some positions, (N, H, P, d/H) each


class Attention(nn.Module):
    """Multi-head self-attention, `scaled_dot_product_attention`; over all tokens unless masked."""

    def __init__(self, dim: int, heads: int, rope: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.rope = heads, rope
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, pos: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.proj(self.mix(h, mask, pos))

    def heads_of(self, h: torch.Tensor, pos: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (N, H, T, d/H) of h (N, T, d); with rope, q and k rotated by the rows'
        positions `pos` (T,) (default 0..T-1)."""
        n, t, d = h.shape
        qkv = self.qkv(h).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.rope:
            pos = torch.arange(t, device=h.device) if pos is None else pos
            q, k = rotary(q, pos), rotary(k, pos)
        return q, k, v

    def mix(self, h: torch.Tensor, mask: torch.Tensor | None = None, pos: torch.Tensor | None = None
            ) -> torch.Tensor:
        """The heads' outputs before the output projection: (N, T, d) -> (N, T, d); mask (T, T)
        or (N, 1, T, T) bool, True where row may attend to column; pos (T,) the rows' positions."""
        n, t, d = h.shape
        q, k, v = self.heads_of(h, pos)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, T, d/H)
        return out.transpose(1, 2).reshape(n, t, d)

    def mix_rows(self, h: torch.Tensor, rows: slice, mask: torch.Tensor | None = None,
                 pos: torch.Tensor | None = None) -> torch.Tensor:
        """`mix(h, mask, pos)[:, rows]` without the other rows' queries and outputs: keys and
        values of every row of h (N, T, d), queries of h[:, rows] only; mask (r, T) or (N, 1, r, T)
        for those rows; returns (N, r, d)."""
        n, t, d = h.shape
        dh = d // self.heads
        w, b = self.qkv.weight, self.qkv.bias  # output features: q, then k, then v (as heads_of)
        q = F.linear(h[:, rows], w[:d], b[:d])  # (N, r, d)
        r = q.shape[1]
        q = q.view(n, r, self.heads, dh).transpose(1, 2)  # (N, H, r, d/H)
        k, v = F.linear(h, w[d:], b[d:]).view(n, t, 2, self.heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
        if self.rope:
            pos = torch.arange(t, device=h.device) if pos is None else pos
            q, k = rotary(q, pos[rows]), rotary(k, pos)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, r, d/H)
        return out.transpose(1, 2).reshape(n, r, d)

    def mix_after(self, h: torch.Tensor, past: KV | None, pos: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        """Decoding: new rows h (N, t, d) at positions `pos` attend to the cached prefix `past` and
        to themselves causally (or as `mask` (t, prefix + t) says); returns their mix (N, t, d)
        and their own keys and values."""
        n, t, d = h.shape
        q, k, v = self.heads_of(h, pos)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        p = keys.shape[2] - t
        if mask is None:
            mask = torch.ones(t, p + t, dtype=torch.bool, device=h.device).tril(p)  # row i sees <= p + i
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (N, H, t, d/H)
        return out.transpose(1, 2).reshape(n, t, d), (k, v)


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(h))

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """(N, T, d) -> (N, T, hidden), the input of fc2."""
        return F.gelu(self.fc1(h), approximate="tanh")


def _per_token(v: torch.Tensor) -> torch.Tensor:
    """A per-sample (N, d) modulation as (N, 1, d); a per-token one (N, T, d) as it is."""
    return v[:, None] if v.dim() == 2 else v


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """h * (1 + scale) + shift with h (N, T, d) and shift, scale (N, d) or (N, T, d)."""
    return torch.addcmul(_per_token(shift), h, 1 + _per_token(scale))


class _NormModulate(torch.autograd.Function):
    """modulate(LN(h), shift, scale) (LN without affine) saving only h, mean and rstd, as a plain
    LayerNorm does: the normalised copy is rebuilt in backward, whose LN part is the fused kernel.
    Memory: one (N, T, d) tensor saved instead of two, and no autograd recomputation pass."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
        xhat, mean, rstd = torch.native_layer_norm(h, (h.shape[-1],), None, None, eps)
        ctx.save_for_backward(h, mean, rstd, scale)
        ctx.eps = eps
        return modulate(xhat, shift, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        h, mean, rstd, scale = ctx.saved_tensors
        xhat = torch.native_layer_norm(h, (h.shape[-1],), None, None, ctx.eps)[0]  # (N, T, d), one pass
        grad_scale = (g * xhat).sum(1)  # (N, d); an einsum here would copy both operands
        grad_shift = g.sum(1)
        del xhat
        grad_h = torch.ops.aten.native_layer_norm_backward(
            g * (1 + scale[:, None]), h, [h.shape[-1]], mean, rstd, None, None, [True, False, False]
        )[0]
        return grad_h, grad_shift, grad_scale, None


class _GatedResidual(torch.autograd.Function):
    """h + gate * (a @ W.T + b) saving a (as the Linear alone does) but not the projection u:
    u is needed only for the gate's gradient and is rebuilt in backward (one matmul, a few % of a
    step), which keeps the adaLN gates from adding two (N, T, d) tensors per layer to memory."""

    @staticmethod
    def forward(ctx, h, gate, a, weight, bias):
        ctx.save_for_backward(gate, a, weight, bias)
        return torch.addcmul(h, gate[:, None], F.linear(a, weight, bias))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        gate, a, weight, bias = ctx.saved_tensors
        a = a.to(weight.dtype)  # under autocast a may be bf16: the backward runs in the weights' dtype
        grad_gate = (g * F.linear(a, weight, bias)).sum(1)  # (N, d)
        gu = (g * gate[:, None]).to(weight.dtype)  # dL/du, (N, T, d)
        grad_a = gu @ weight  # (N, T, d_in)
        grad_w = gu.reshape(-1, gu.shape[-1]).T @ a.reshape(-1, a.shape[-1])  # (d, d_in)
        return g, grad_gate, grad_a, grad_w, gu.sum((0, 1))


def gated_residual(h: torch.Tensor, gate: torch.Tensor, proj: nn.Linear, a: torch.Tensor) -> torch.Tensor:
    """h + gate * proj(a): h (N, T, d), gate (N, d) or (N, T, d), a (N, T, d_in) -> (N, T, d)."""
    if torch.is_grad_enabled() and gate.dim() == 2:
        return _GatedResidual.apply(h, gate, a, proj.weight, proj.bias)
    return torch.addcmul(h, _per_token(gate), proj(a))


def norm_modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """modulate(LayerNorm(h), shift, scale): (N, T, d), (N, d) or (N, T, d) twice -> (N, T, d)."""
    grad = h.requires_grad or shift.requires_grad or scale.requires_grad
    if torch.is_grad_enabled() and grad and shift.dim() == 2:
        return _NormModulate.apply(h, shift, scale, eps)
    return modulate(F.layer_norm(h, (h.shape[-1],), eps=eps), shift, scale)


def modulation_projection(dim: int, gate_init: float, cond_dim: int | None = None) -> nn.Sequential:
    """c (.., cond_dim, default d) -> shift, scale, gate of attention and MLP (.., 6d): SiLU then a
    zero-initialised Linear whose gate biases are gate_init, so gate = gate_init at any noise level
    at first."""
    proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))
    nn.init.zeros_(proj[1].weight)
    nn.init.zeros_(proj[1].bias)
    with torch.no_grad():
        proj[1].bias[2 * dim : 3 * dim] = gate_init
        proj[1].bias[5 * dim : 6 * dim] = gate_init
    return proj


CONDITIONINGS = ("adaln", "adaln-single")  # a noise embedding of width d, or of width r
MODULATION_RANK = 16  # adaln-single: the embedding's width r (benches/results/params_vit.json)


class AdaLNLayer(nn.Module):
    """DiT layer: pre-LN attention and MLP, shift/scale/gate of each from the noise embedding c.

    The modulation projection is zero-initialised. gate_init = 0 is DiT's adaLN-Zero (a fresh layer
    is the identity); gate_init = 1 starts it as a plain pre-LN layer, independent of the noise level.
    c has width `cond_dim` (default d): adaln-single passes the block's rank-r noise embedding.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, gate_init: float = 0.0,
                 rope: bool = False, cond_dim: int | None = None) -> None:
        super().__init__()
        self.eps = LN_EPS
        self.attn = Attention(dim, heads, rope)
        self.mlp = Mlp(dim, mlp_ratio)
        self.modulation = modulation_projection(dim, gate_init, cond_dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None,
                pos: torch.Tensor | None = None) -> torch.Tensor:
        """h (N, T, d); c per sample (N, d), per token (N, T, d) or per segment (N, S, d) (d: the
        layer's cond_dim): S equal runs of T/S tokens (modulated once per segment); mask and pos
        see `Attention.mix`."""
        mod = self.modulation(c)  # (N, 6d), (N, T, 6d) or (N, S, 6d)
        if mod.dim() == 3 and mod.shape[1] != h.shape[1]:
            return self._segmented(h, mod, mask, pos)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        a = self.attn.mix(norm_modulate(h, shift1, scale1, self.eps), mask, pos)  # (N, T, d)
        return self._mlp(gated_residual(h, gate1, self.attn.proj, a), shift2, scale2, gate2)

    def forward_rows(self, h: torch.Tensor, c: torch.Tensor, rows: slice, mask: torch.Tensor | None = None,
                     pos: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(h, c, mask, pos)[:, rows]` (N, r, d) computing only what those rows need: every
        row's keys and values, but queries, attention output and MLP of `rows` alone (mask: their
        rows of it). A readout of a few rows (a class token) skips most of the last layer's work
        and memory. c per sample (N, d), per token (N, T, d) or per segment (N, S, d), then `rows`
        must be whole segments."""
        mod = self.modulation(c)  # (N, 6d), (N, T, 6d) or (N, S, 6d)
        if mod.dim() == 3 and mod.shape[1] != h.shape[1]:
            return self._segmented_rows(h, mod, rows, mask, pos)
        shift1, scale1, *rest = mod.chunk(6, dim=-1)
        if mod.dim() == 3:
            rest = [m[:, rows] for m in rest]
        gate1, shift2, scale2, gate2 = rest
        a = self.attn.mix_rows(norm_modulate(h, shift1, scale1, self.eps), rows, mask, pos)  # (N, r, d)
        return self._mlp(gated_residual(h[:, rows], gate1, self.attn.proj, a), shift2, scale2, gate2)

    def _segmented(self, h: torch.Tensor, mod: torch.Tensor, mask: torch.Tensor | None,
                   pos: torch.Tensor | None) -> torch.Tensor:
        """Per-segment conditioning: each run of T/S tokens is modulated by its own (N, d) rows, so
        the memory-lean per-sample paths apply and no (N, T, 6d) modulation is materialised."""
        parts = mod.shape[1]
        mods = [m.chunk(6, dim=-1) for m in mod.unbind(1)]  # S x (shift1, scale1, gate1, shift2, ...)
        hs = h.chunk(parts, dim=1)  # S x (N, T/S, d)
        x = torch.cat([norm_modulate(hk, m[0], m[1], self.eps) for hk, m in zip(hs, mods, strict=True)], 1)
        a = self.attn.mix(x, mask, pos).chunk(parts, dim=1)  # attention over all T tokens
        hs = [gated_residual(hk, m[2], self.attn.proj, ak) for hk, m, ak in zip(hs, mods, a, strict=True)]
        return torch.cat([self._mlp(hk, m[3], m[4], m[5]) for hk, m in zip(hs, mods, strict=True)], 1)

    def _segmented_rows(self, h: torch.Tensor, mod: torch.Tensor, rows: slice, mask: torch.Tensor | None,
                        pos: torch.Tensor | None) -> torch.Tensor:
        """`forward_rows` with per-segment conditioning: `rows` spans whole segments."""
        parts, t = mod.shape[1], h.shape[1]
        size = t // parts
        first, stop, step = rows.indices(t)
        if step != 1 or first % size or stop % size or stop <= first:
            raise ValueError(f"rows {rows} must be whole segments of {size} of the {t} rows")
        mods = [m.chunk(6, dim=-1) for m in mod.unbind(1)]  # S x (shift1, scale1, gate1, shift2, ...)
        hs = h.chunk(parts, dim=1)  # S x (N, T/S, d)
        x = torch.cat([norm_modulate(hk, m[0], m[1], self.eps) for hk, m in zip(hs, mods, strict=True)], 1)
        a = self.attn.mix_rows(x, rows, mask, pos).chunk((stop - first) // size, dim=1)
        kept = range(first // size, stop // size)
        return torch.cat([self._mlp(gated_residual(hs[k], mods[k][2], self.attn.proj, ak), *mods[k][3:])
                          for k, ak in zip(kept, a, strict=True)], 1)

    def step(self, h: torch.Tensor, c: torch.Tensor, past: KV | None, pos: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        """Decoding: new rows h (N, t, d) at positions `pos` after a cached prefix
        (`Attention.mix_after`, with its mask); returns (N, t, d) and the new rows' keys and values."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        a, kv = self.attn.mix_after(norm_modulate(h, shift1, scale1, self.eps), past, pos, mask)
        return self._mlp(gated_residual(h, gate1, self.attn.proj, a), shift2, scale2, gate2), kv

    def _mlp(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor
             ) -> torch.Tensor:
        m = self.mlp.hidden(norm_modulate(h, shift, scale, self.eps))  # (N, T, hidden)
        return gated_residual(h, gate, self.mlp.fc2, m)


class AdaLNFinal(nn.Module):
    """Final LN with noise-dependent shift/scale, then Linear d -> out (all zero-initialised);
    c has width `cond_dim` (default d), as `AdaLNLayer`'s."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h (N, d) or (N, T, d), c (N, cond_dim) or (N, T, cond_dim) -> (N, out) or (N, T, out)."""
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        if h.dim() == 3:
            shift, scale = _per_token(shift), _per_token(scale)
        return self.linear(self.norm(h) * (1 + scale) + shift)


def sinusoidal_embedding(
    t: torch.Tensor, dim: int, max_period: float = NOISE_MAX_PERIOD
) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / (dim/2)); t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]  # (N, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class NoiseEmbedder(nn.Module):
    """c_noise (N,) -> sinusoidal(NOISE_SCALE * c_noise) -> MLP -> (N, d); with `hidden` False one
    Linear instead of the MLP (adaln-single's rank-r embedding, which every layer projects)."""

    def __init__(self, dim: int, freq_dim: int = NOISE_FREQ_DIM, hidden: bool = True) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = (nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if hidden
                    else nn.Sequential(nn.Linear(freq_dim, dim)))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(NOISE_SCALE * c_noise, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class PreLNLayer(nn.Module):
    """Plain pre-LN transformer layer (the end-to-end baseline): h + attn(LN h), h + mlp(LN h)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, rope: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, rope)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, pos: torch.Tensor | None = None
                ) -> torch.Tensor:
        """h (N, T, d) -> (N, T, d)."""
        h = h + self.attn(self.norm1(h), mask, pos)
        return h + self.mlp(self.norm2(h))

    def forward_rows(self, h: torch.Tensor, rows: slice, mask: torch.Tensor | None = None,
                     pos: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(h, mask, pos)[:, rows]` (N, r, d): every row's keys and values, the rest only
        for `rows` (as `AdaLNLayer.forward_rows`)."""
        h = h[:, rows] + self.attn.proj(self.attn.mix_rows(self.norm1(h), rows, mask, pos))
        return h + self.mlp(self.norm2(h))

    def step(self, h: torch.Tensor, past: KV | None, pos: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        """New rows h (N, t, d) after a cached prefix (causal, or as `mask` (t, prefix + t) says);
        (N, t, d) and their keys/values."""
        a, kv = self.attn.mix_after(self.norm1(h), past, pos, mask)
        h = h + self.attn.proj(a)
        return h + self.mlp(self.norm2(h)), kv


def _is_batched(v: object, n: int) -> bool:
    """Whether an argument of a layer has the batch as its first dimension: activations (N, ..),
    conditioning (N, d) and per-sample masks (N, 1, T, T); a (T, T) bool mask and positions (T,)
    are shared by the whole batch."""
    return (isinstance(v, torch.Tensor) and v.dim() >= 2 and len(v) == n
            and not (v.dtype == torch.bool and v.dim() == 2))


def _cat_outputs(outs: list) -> object:
    """Join per-slice outputs (tensors, or tuples of them as `step` returns) along the batch."""
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return type(outs[0])(_cat_outputs(list(parts)) for parts in zip(*outs, strict=True))


_SLICES = "_dbcore_checkpointed_slices"  # the per-slice outputs a joined output was made of


def checkpointed(fn, *args, chunks: int = 1, **kwargs):
    """fn(*args, **kwargs) keeping only its inputs for backward, which recomputes the rest.

    With `chunks` > 1 the batch (first dimension of args[0]) is cut into that many slices, each
    checkpointed alone: backward recomputes one slice at a time, so the working set of a
    recomputed layer (its activations and their gradients) falls by about `chunks`. Layers are
    per-sample maps, so values and gradients are those of the whole batch up to rounding."""
    from torch.utils.checkpoint import checkpoint

    n = len(args[0])
    chunks = min(chunks, n)
    if chunks <= 1:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    sizes = [n // chunks + (i < n % chunks) for i in range(chunks)]  # as even as n allows

    def sliced(v: object) -> list:
        if isinstance(v, tuple | list):  # a decoding cache (keys, values): slice each part
            return [type(v)(parts) for parts in zip(*(sliced(e) for e in v), strict=True)]
        joined_from = getattr(v, _SLICES, None)
        if joined_from is not None and [len(p) for p in joined_from] == sizes:
            # a checkpointed layer's output, cut alike: its slices themselves, so that in backward
            # each slice's gradient goes straight to that layer and is freed there, instead of all
            # slices' gradients being joined into one more (N, ..) tensor in between
            return list(joined_from)
        return list(v.split(sizes)) if _is_batched(v, n) else [v] * chunks

    arg_parts = [sliced(a) for a in args]
    kwarg_parts = {k: sliced(v) for k, v in kwargs.items()}
    outs = [checkpoint(fn, *(p[i] for p in arg_parts), use_reentrant=False,
                       **{k: p[i] for k, p in kwarg_parts.items()}) for i in range(chunks)]
    joined = _cat_outputs(outs)
    if isinstance(joined, torch.Tensor):
        setattr(joined, _SLICES, tuple(outs))
    return joined


def checkpoint_layers(model: nn.Module, chunks: int = 1) -> nn.Module:
    """Activation checkpointing of every layer of `model.layers` (a block or a whole baseline):
    each keeps only its input for backward and recomputes the rest (`forward`, `forward_rows`
    and, for decoding layers, `step`), over `chunks` slices of the batch (`checkpointed`), in
    training with gradients on; elsewhere the layers run as before. Parameter names do not
    change, so checkpoints are the same with or without it."""
    if chunks < 1:
        raise ValueError(f"checkpoint chunks must be >= 1, got {chunks}")
    for layer in model.layers:
        for name in ("forward", "forward_rows", "step"):
            method = getattr(layer, name, None)
            if method is None:
                continue

            def run(*args, _method=method, _layer=layer, **kwargs):
                if _layer.training and torch.is_grad_enabled():
                    return checkpointed(_method, *args, chunks=chunks, **kwargs)
                return _method(*args, **kwargs)

            setattr(layer, name, run)
    return model


def make_target_embedding(
    num_classes: int, dim: int, seed: int, scale: float = 1.0
) -> torch.Tensor:
    """Frozen class embedding E (V, d) float32: seeded Gaussian rows scaled to norm `scale`."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    return (scale * e / e.norm(dim=1, keepdim=True)).float()
