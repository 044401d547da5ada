"""CuPy implementations wrapped as torch.autograd.Functions (CUDA tensors only)."""

from __future__ import annotations

import math

import torch

from dbcore.kernels._cupy import MAX_GRID_Y, THREADS, launch, suffix, torch_stream
from dbcore.kernels.reference import dist_params
from dbcore.method.edm import P_MEAN, P_STD, SIGMA_DATA

_NATIVE = (torch.float32, torch.bfloat16)


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, E) contiguous view (or copy) of t in dtype."""
    return t.reshape(len(t), -1).to(dtype).contiguous()


def _vec_ok(e: int, *ts: torch.Tensor) -> bool:
    # 4-element vector access needs rows of a multiple of 4 and 4-element-aligned bases
    return e % 4 == 0 and all(t.data_ptr() % (4 * t.element_size()) == 0 for t in ts)


def _seed_key(seed: int) -> tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def noise_forward(
    y: torch.Tensor, sample_idx: torch.Tensor, seed: int, block: int, draw: int,
    lo: float, hi: float, dist: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import numpy as np

    code, a, b = dist_params(dist, lo, hi)
    dtype = y.dtype if y.dtype in _NATIVE else torch.float32
    n = len(y)
    y2 = _rows(y, dtype)
    e = y2.shape[1]
    sample = sample_idx.to(device=y.device, dtype=torch.int64).contiguous()
    z, cz = torch.empty_like(y2), torch.empty_like(y2)
    sigma = torch.empty(n, dtype=torch.float32, device=y.device)
    if n and e:
        groups = (e + 3) // 4
        grid = (min(math.ceil(groups / THREADS), 4096), min(n, MAX_GRID_Y))
        k0, k1 = _seed_key(seed)
        with torch_stream(y.device) as dev:
            launch(f"dbc_noise_{suffix(dtype)}", dev, grid, (
                y2, z, cz, sigma, sample, np.int64(n), np.int64(e),
                np.int32(_vec_ok(e, y2, z, cz)), np.uint32(k0), np.uint32(k1), np.uint32(block),
                np.uint32(draw), np.int32(code), np.float64(a), np.float64(b),
                np.float64(P_MEAN), np.float64(P_STD), np.float64(SIGMA_DATA),
            ))
    return z.view(y.shape).to(y.dtype), cz.view(y.shape).to(y.dtype), sigma


class NoiseAndInput(torch.autograd.Function):
    """(z, c_in*z, sigma) from y; differentiable in y (dz/dy = 1, d(c_in z)/dy = c_in)."""

    @staticmethod
    def forward(ctx, y, sample_idx, seed, block, draw, lo, hi, dist):
        z, cz, sigma = noise_forward(y, sample_idx, seed, block, draw, lo, hi, dist)
        ctx.save_for_backward(sigma)
        ctx.mark_non_differentiable(sigma)
        return z, cz, sigma

    @staticmethod
    def backward(ctx, g_z, g_cz, _g_sigma):
        (sigma,) = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            ref = g_z if g_z is not None else g_cz
            c_in = torch.rsqrt(sigma * sigma + SIGMA_DATA**2).view(-1, *([1] * (ref.dim() - 1)))
            grad = torch.zeros_like(ref) if g_z is None else g_z.clone()
            if g_cz is not None:
                grad = grad + c_in.to(g_cz.dtype) * g_cz
        return grad, None, None, None, None, None, None, None


def _common_dtype(*ts: torch.Tensor) -> torch.dtype:
    dtypes = {t.dtype for t in ts}
    return dtypes.pop() if len(dtypes) == 1 and ts[0].dtype in _NATIVE else torch.float32


class MSELoss(torch.autograd.Function):
    """Per-sample w_i * mean((c_skip z + c_out F - y)^2), (N,) float32; sigma is a constant."""

    @staticmethod
    def forward(ctx, z, raw, y, sigma, w):
        import numpy as np

        dtype = _common_dtype(z, raw, y)
        z2, f2, y2 = (_rows(t, dtype) for t in (z, raw, y))
        sigma, w = (t.to(torch.float32).contiguous() for t in (sigma, w))
        n, e = z2.shape
        mse = torch.zeros(n, dtype=torch.float32, device=z.device)
        loss = torch.zeros_like(mse)
        if n and e:
            parts = min(max(math.ceil(e / (THREADS * 8)), 1), 256)
            partial = torch.empty(n, parts, dtype=torch.float32, device=z.device)
            with torch_stream(z.device) as dev:
                launch(f"dbc_mse_partial_{suffix(dtype)}", dev, (parts, min(n, MAX_GRID_Y)), (
                    z2, f2, y2, sigma, np.int64(n), np.int64(e), np.float64(SIGMA_DATA), partial,
                ))
                launch("dbc_mse_finalize", dev, (math.ceil(n / THREADS),), (
                    partial, np.int32(parts), w, np.int64(n), np.int64(e), mse, loss,
                ))
        ctx.save_for_backward(z2, f2, y2, sigma, w, mse)
        ctx.dtypes = (z.dtype, raw.dtype, y.dtype)
        ctx.shapes = (z.shape, raw.shape, y.shape)
        return loss

    @staticmethod
    def backward(ctx, g):
        import numpy as np

        z2, f2, y2, sigma, w, mse = ctx.saved_tensors
        n, e = z2.shape
        need_z, need_f, need_y = ctx.needs_input_grad[:3]
        gz, gf, gy = (torch.empty_like(z2) if need else None for need in (need_z, need_f, need_y))
        if n and e and (need_z or need_f or need_y):
            grid = (min(math.ceil(e / THREADS), 4096), min(n, MAX_GRID_Y))
            gc = g.to(torch.float32).contiguous()
            with torch_stream(z2.device) as dev:
                launch(f"dbc_mse_backward_{suffix(z2.dtype)}", dev, grid, (
                    z2, f2, y2, sigma, w, gc, np.int64(n), np.int64(e), np.float64(SIGMA_DATA),
                    gf, gz, gy,
                ))
        out = [
            None if t is None else t.view(shape).to(dtype)
            for t, shape, dtype in zip((gz, gf, gy), ctx.shapes, ctx.dtypes, strict=True)
        ]
        g_w = g * mse if ctx.needs_input_grad[4] else None
        return out[0], out[1], out[2], None, g_w


class CELoss(torch.autograd.Function):
    """Per-row w_i * CE(logits_i, label_i), (N,) float32; label -100 gives 0."""

    @staticmethod
    def forward(ctx, logits, labels, w):
        import numpy as np

        dtype = logits.dtype if logits.dtype in _NATIVE else torch.float32
        x = logits.to(dtype).contiguous()
        labels = labels.to(torch.int64).contiguous()
        w = w.to(torch.float32).contiguous()
        n, v = x.shape
        loss = torch.zeros(n, dtype=torch.float32, device=x.device)
        stats = torch.zeros(n, 2, dtype=torch.float32, device=x.device)  # max, ln sum exp
        if n and v:
            with torch_stream(x.device) as dev:
                launch(f"dbc_ce_forward_{suffix(dtype)}", dev, (min(n, 1 << 20),), (
                    x, labels, w, np.int64(n), np.int64(v), loss, stats,
                ))
        ctx.save_for_backward(x, labels, stats, w)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        import numpy as np

        x, labels, stats, w = ctx.saved_tensors
        n, v = x.shape
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            if n and v:
                grid = (math.ceil(v / (THREADS * 4)), min(n, MAX_GRID_Y))
                gc = g.to(torch.float32).contiguous()
                with torch_stream(x.device) as dev:
                    launch(f"dbc_ce_backward_{suffix(x.dtype)}", dev, grid, (
                        x, labels, stats, w, gc, np.int64(n), np.int64(v), grad_x,
                    ))
            grad_x = grad_x.to(ctx.logits_dtype)
        g_w = None
        if ctx.needs_input_grad[2]:
            keep = labels != -100
            x_lab = x.gather(1, labels.clamp(min=0)[:, None])[:, 0].float()
            ce = (stats[:, 0] - x_lab) + stats[:, 1]
            g_w = g * torch.where(keep, ce, torch.zeros_like(ce))
        return grad_x, None, g_w
