"""CuPy kernels of dbcore.kernels against PyTorch eager and torch.compile, on one CUDA device.

    python benches/bench_kernels.py [--batch 256 --tokens 1024 --dim 768 --ce-rows 8192
                                     --vocab 32000 --dtype float32 --peak-gbps N]
Times each kernel with CUDA events (median of --iters after --warmup), reports the bytes each one
must move, the achieved bandwidth and its fraction of the device's peak, and writes
benches/results/kernels.json. Without a CUDA device or CuPy it prints "skipped: ..." and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from dbcore import __version__
from dbcore.kernels import block_loss_ce, block_loss_mse, noise_and_input
from dbcore.kernels._cupy import cupy_available, import_cupy
from dbcore.kernels.reference import ce_per_sample, mse_per_sample
from dbcore.method import rng
from dbcore.method.edm import SIGMA_DATA
from dbcore.method.loss import sample_weights
from dbcore.method.partition import block_range, cdf

OUT = Path(__file__).resolve().parent / "results" / "kernels.json"
SEED, BLOCK, DRAW = 1234, 1, 0


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gbps(arg: float | None) -> float | None:
    """Peak DRAM bandwidth: 2 (double data rate) * memory clock * bus width / 8."""
    if arg:
        return arg
    cp = import_cupy()
    dev = torch.cuda.current_device()
    props = cp.cuda.runtime.getDeviceProperties(dev)
    clock_khz, bus_bits = props.get("memoryClockRate"), props.get("memoryBusWidth")
    try:  # CUDA 13 dropped memoryClockRate from cudaDeviceProp; the attribute query remains
        clock_khz = clock_khz or cp.cuda.runtime.deviceGetAttribute(36, dev)  # MemoryClockRate
        bus_bits = bus_bits or cp.cuda.runtime.deviceGetAttribute(37, dev)  # GlobalMemoryBusWidth
    except Exception:  # noqa: BLE001 - any failure means "unknown", reported as null
        return None
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def eager_noise(y: torch.Tensor, sample: torch.Tensor, lo: float, hi: float):
    """The same noise in PyTorch ops on the GPU (Philox in int64, Box-Muller in float32)."""
    n, e = y.shape
    j = torch.arange((e + 3) // 4, device=y.device)[None, :]
    full = torch.broadcast_to
    ctr = (full(j, (n, j.shape[1])), full(sample[:, None], (n, j.shape[1])),
           torch.full((n, j.shape[1]), BLOCK, device=y.device),
           torch.full((n, j.shape[1]), DRAW, device=y.device))
    x = [(v.float() + 0.5) * 2.0**-32 for v in rng.philox4x32(ctr, SEED)]
    r01, r23 = torch.sqrt(-2 * torch.log(x[0])), torch.sqrt(-2 * torch.log(x[2]))
    eps = torch.stack([r01 * torch.cos(2 * math.pi * x[1]), r01 * torch.sin(2 * math.pi * x[1]),
                       r23 * torch.cos(2 * math.pi * x[3]), r23 * torch.sin(2 * math.pi * x[3])],
                      -1).reshape(n, -1)[:, :e]
    sc = (full(torch.tensor(rng.SIGMA_GROUP, device=y.device), (n,)), sample,
          torch.full((n,), BLOCK, device=y.device), torch.full((n,), DRAW, device=y.device))
    u = (rng.philox4x32(sc, SEED)[0].double() + 0.5) * 2.0**-32
    q_lo, q_hi = cdf(lo), cdf(hi)
    sigma = torch.exp(-1.2 + 1.2 * torch.special.ndtri(q_lo + u * (q_hi - q_lo))).float()
    z = y + sigma[:, None] * eps
    return z, z * torch.rsqrt(sigma * sigma + SIGMA_DATA**2)[:, None], sigma


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--ce-rows", type=int, default=8192, help="rows of the CE logits (tokens)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--peak-gbps", type=float, default=None, help="device peak, else from CuPy")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    if not cupy_available():
        print("skipped: CuPy not installed (pip install 'dbcore[cuda]')")
        return 0
    cp = import_cupy()
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    size = dtype.itemsize
    n, e = args.batch, args.tokens * args.dim
    lo, hi = block_range(BLOCK, 4)
    sample = torch.arange(n, device=dev)
    y = torch.randn(n, e, device=dev).to(dtype)
    raw = torch.randn(n, e, device=dev).to(dtype).requires_grad_(True)
    z = torch.randn(n, e, device=dev).to(dtype)
    sigma = torch.rand(n, device=dev) * 2 + 0.01
    w = sample_weights(sigma, "edm")
    rows, v = args.ce_rows, args.vocab
    logits = torch.randn(rows, v, device=dev).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (rows,), device=dev)
    w_rows = torch.rand(rows, device=dev)

    def mse_step(fn):
        def run():
            raw.grad = None
            fn().backward()
        return run

    def ce_step(fn):
        def run():
            logits.grad = None
            fn().backward()
        return run

    mse_eager = lambda: mse_per_sample(z, raw, y, sigma, w).mean()  # noqa: E731
    ce_eager = lambda: ce_per_sample(logits, labels, w_rows).mean()  # noqa: E731
    noise_eager = lambda: eager_noise(y, sample, lo, hi)  # noqa: E731
    cases: dict[str, tuple[float, dict[str, Callable[[], object]]]] = {
        # kernel -> (bytes it must move at least, implementations)
        "noise_and_input": (3 * n * e * size, {
            "cupy": lambda: noise_and_input(y, sample, SEED, BLOCK, DRAW, lo, hi, backend="cupy"),
            "eager": noise_eager,
        }),
        "mse_fwd_bwd": (7 * n * e * size, {  # fwd reads z, F, y; bwd reads them again, writes dF
            "cupy": mse_step(lambda: block_loss_mse(z, raw, y, sigma, w, backend="cupy")),
            "eager": mse_step(mse_eager),
        }),
        "ce_fwd_bwd": (3 * rows * v * size, {  # fwd reads logits; bwd reads them, writes grads
            "cupy": ce_step(lambda: block_loss_ce(logits, labels, w_rows, backend="cupy")),
            "eager": ce_step(ce_eager),
        }),
    }
    if not args.no_compile:
        cases["noise_and_input"][1]["compile"] = torch.compile(noise_eager)
        cases["mse_fwd_bwd"][1]["compile"] = mse_step(torch.compile(mse_eager))
        cases["ce_fwd_bwd"][1]["compile"] = ce_step(torch.compile(ce_eager))
    peak = peak_gbps(args.peak_gbps)
    results = []
    for kernel, (nbytes, impls) in cases.items():
        for impl, fn in impls.items():
            try:
                ms = time_ms(fn, args.warmup, args.iters)
            except Exception as exc:  # noqa: BLE001 - a failing baseline (OOM, compile) is reported
                results.append({"kernel": kernel, "impl": impl, "error": repr(exc)[:300]})
                print(f"{kernel:16s} {impl:8s} failed: {exc!r}"[:200])
                torch.cuda.empty_cache()
                continue
            gbps = nbytes / ms / 1e6
            frac = gbps / peak if peak else None
            results.append({"kernel": kernel, "impl": impl, "ms": ms, "bytes": nbytes,
                            "gbps": gbps, "frac_peak": frac})
            print(f"{kernel:16s} {impl:8s} {ms:9.3f} ms {gbps:8.1f} GB/s"
                  + (f" ({100 * frac:.0f}% of peak)" if frac else ""))
    report = {
        "device": torch.cuda.get_device_name(),
        "peak_gbps": peak,
        "versions": {"dbcore": __version__, "torch": torch.__version__, "cupy": cp.__version__,
                     "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
                     "python": platform.python_version()},
        "shapes": {"batch": n, "tokens": args.tokens, "dim": args.dim, "ce_rows": rows,
                   "vocab": v, "dtype": args.dtype},
        "timing": {"warmup": args.warmup, "iters": args.iters, "stat": "median, CUDA events"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
