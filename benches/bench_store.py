"""Store throughput: dbcore (Rust, zarrs) vs zarr-python vs zarr-python with the zarrs pipeline.

Same arrays, same layout (row chunks inside shards, zstd level 3 with checksum), side by side:
whole-array write, full read, and random-row gathers (batches of 256 rows, as a training loop
draws them). Reads come from the page cache (the files were just written). Writes JSON to
benches/results/store.json.

    python benches/bench_store.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from dbcore.data import store

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "datasets" / "mnist" / "train.npz"
LEVEL = 3
BATCH = 256
IMPLS = ("dbcore", "zarr-python", "zarr-python+zarrs")


def arrays(quick: bool) -> dict[str, np.ndarray]:
    if MNIST.exists():
        images = np.load(MNIST)["images"]  # (50000, 28, 28) uint8
    else:  # MNIST-like stand-in: sparse strokes on a black background
        rng = np.random.default_rng(0)
        images = (rng.random((50_000, 28, 28)) < 0.2).astype(np.uint8) * rng.integers(
            0, 256, (50_000, 28, 28), dtype=np.uint8
        )
    rows = 32_768 if quick else 131_072  # float16 activations: 64 MiB or 256 MiB
    rng = np.random.default_rng(1)
    acts = (rng.standard_normal((rows, 1024), dtype=np.float32) * 0.5).astype(np.float16)
    return {"mnist_uint8": images, "activations_float16": acts}


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def machine() -> dict[str, object]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus_available": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / 2**30, 1),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],  # shared machines: noise
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("dbcore", "zarr", "zarrs", "numpy", "numcodecs"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = "missing"
    return out


Ops = tuple[Callable[[], object], Callable[[], np.ndarray], Callable[[], list[np.ndarray]]]


def dbcore_ops(path: Path, x: np.ndarray, chunk: int, shard: int, batches: list) -> Ops:
    def write() -> None:
        s = store.create(path, overwrite=True)
        s.write_array("x", x, chunks=chunk, shards=shard, level=LEVEL)
        s.finalize()

    def read_all() -> np.ndarray:
        return store.open(path).read("x")

    def gather() -> list[np.ndarray]:
        s = store.open(path)
        return [s.read("x", b) for b in batches]

    return write, read_all, gather


def zarr_ops(path: Path, x: np.ndarray, chunks: tuple, shards: tuple | None, batches: list,
             cfg: dict) -> Ops:
    def write() -> None:
        with zarr.config.set(cfg):
            a = zarr.create_array(
                store=str(path), name="x", shape=x.shape, dtype=x.dtype, chunks=chunks,
                shards=shards, compressors=ZstdCodec(level=LEVEL, checksum=True), fill_value=0,
                zarr_format=3, overwrite=True,
            )
            a[:] = x

    def read_all() -> np.ndarray:
        with zarr.config.set(cfg):
            return zarr.open_array(str(path / "x"), mode="r")[:]

    def gather() -> list[np.ndarray]:
        with zarr.config.set(cfg):
            a = zarr.open_array(str(path / "x"), mode="r")
            return [a.oindex[b] for b in batches]

    return write, read_all, gather


def default_layout(x: np.ndarray, tmp: Path) -> tuple[tuple, tuple | None]:
    s = store.create(tmp / "layout.zarr", overwrite=True)
    s.array_writer("x", x.shape, x.dtype)  # metadata only: dbcore's default layout for x
    info = s.info("x")
    shutil.rmtree(tmp / "layout.zarr")
    return info.chunks, info.shards


def bench_array(name: str, x: np.ndarray, tmp: Path, repeat: int, n_batches: int) -> dict:
    chunks, shards = default_layout(x, tmp)
    rng = np.random.default_rng(2)
    batches = [rng.choice(len(x), BATCH, replace=False) for _ in range(n_batches)]
    mb = x.nbytes / 1e6
    gather_mb = n_batches * BATCH * x[0].nbytes / 1e6
    result: dict = {
        "shape": list(x.shape),
        "dtype": x.dtype.name,
        "mb": round(mb, 1),
        "chunks": list(chunks),
        "shards": list(shards) if shards else None,
        "zstd_level": LEVEL,
        "gather": {"batches": n_batches, "rows_per_batch": BATCH},
        "impls": {},
    }
    for impl in IMPLS:
        path = tmp / f"{name}-{impl}.zarr"
        if impl == "dbcore":
            ops = dbcore_ops(path, x, chunks[0], shards[0] if shards else 0, batches)
        else:
            cfg = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"} if "zarrs" in impl else {}
            ops = zarr_ops(path, x, chunks, shards, batches, cfg)
        write, read_all, gather = ops
        t_write, _ = timed(write, repeat)
        t_read, y = timed(read_all, repeat)
        assert np.array_equal(y, x), f"{impl} read back different values"
        t_gather, ys = timed(gather, repeat)
        assert all(np.array_equal(g, x[b]) for g, b in zip(ys, batches, strict=True))
        stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        result["impls"][impl] = {
            "write_s": round(t_write, 4),
            "write_mb_s": round(mb / t_write, 1),
            "read_s": round(t_read, 4),
            "read_mb_s": round(mb / t_read, 1),
            "gather_ms_per_batch": round(1e3 * t_gather / n_batches, 3),
            "gather_mb_s": round(gather_mb / t_gather, 1),
            "bytes_on_disk": stored,
        }
        print(f"{name:20s} {impl:18s} write {mb / t_write:7.1f} MB/s  read {mb / t_read:7.1f} MB/s"
              f"  gather {1e3 * t_gather / n_batches:7.2f} ms/batch  ({stored / 1e6:.1f} MB stored)")
        shutil.rmtree(path)
    d = result["impls"]["dbcore"]
    result["ratios_dbcore_over"] = {
        other: {
            k: round(d[k] / result["impls"][other][k], 2)
            for k in ("write_mb_s", "read_mb_s", "gather_mb_s")
        }
        for other in IMPLS[1:]
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller arrays, one repeat")
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "store.json")
    args = ap.parse_args()
    repeat, n_batches = (1, 5) if args.quick else (3, 20)
    report: dict = {
        "benchmark": "store write/read/gather throughput (MB/s of uncompressed data, best of "
        f"{repeat}; reads from the page cache)",
        "machine": machine(),
        "versions": versions(),
        "arrays": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        for name, x in arrays(args.quick).items():
            report["arrays"][name] = bench_array(name, x, Path(tmp), repeat, n_batches)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
