"""Shuffled mini-batch reads: dbcore BatchStream vs zarr-python (plain / zarrs pipeline) vs a torch
DataLoader over an uncompressed NumPy memmap, beside the memory-copy speed of the same bytes.

Three stores, all read from the page cache (written or read just before):
- MNIST cached with `configs/vit_mnist.toml` (B=4 blocks, K=4 draws): a block's batch is
  images, labels, noised_z_b0[:, k], noised_sigma_b0[:, k];
- synthetic activations, float16 (N, 256, 384), >= 2 GB, written once into /tmp: zstd and
  uncompressed (`compression=None`, the default for floats: benches/bench_codec.py).

Every reader gets the same batches (BatchStream's chunk-window order of epoch 0). Also measured:
the fraction of a ViT block training step spent waiting for data (BatchStream feeding the MNIST
recipe). Writes benches/results/stream.json.

    python benches/bench_stream.py [--quick] [--out PATH] [--workdir /tmp/dbcore_bench_stream]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import zarr

from dbcore import config as config_mod
from dbcore.data import store
from dbcore.data.stream import BatchStream
from dbcore.method import layout
from dbcore.method.batch import INDEX
from dbcore.method.noise import block_noise
from dbcore.method.partition import block_sigma_law

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "datasets" / "mnist" / "train.npz"
ZARRS = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}


def timed(fn, budget_s: float, max_batches: int) -> tuple[int, int, float]:
    """Run fn(i) -> (samples, bytes) for i = 0.. until the budget or max_batches; totals and seconds."""
    t0 = time.perf_counter()
    samples = nbytes = i = 0
    while i < max_batches and time.perf_counter() - t0 < budget_s:
        s, b = fn(i)
        samples, nbytes, i = samples + s, nbytes + b, i + 1
    return samples, nbytes, time.perf_counter() - t0


def rate(samples: int, nbytes: int, secs: float, batches: int | None = None) -> dict:
    return {"samples_per_s": round(samples / secs, 1), "MB_per_s": round(nbytes / secs / 1e6, 1),
            "samples": samples, "seconds": round(secs, 3)}


# ----------------------------------------------------------------------------- data


def mnist_store(work: Path) -> Path:
    from dbcore.data.cache import write_cache
    from dbcore.data.sources import load_source

    out = work / "mnist_k4.zarr"
    try:
        store.open(out)
        return out
    except store.StoreError:
        pass
    cfg = config_mod.load(ROOT / "configs" / "vit_mnist.toml")
    t0 = time.perf_counter()
    write_cache(cfg, load_source(f"npz:{MNIST}"), out, noise="cached", draws=4, seed=0,
                overwrite=True, progress=False)
    print(f"cached MNIST (B=4, K=4) in {time.perf_counter() - t0:.1f}s")
    return out


def synthetic_store(work: Path, rows: int) -> tuple[Path, Path]:
    """float16 (rows, 256, 384) activations as a store and as an uncompressed .npy memmap."""
    out, npy = work / f"acts_{rows}.zarr", work / f"acts_{rows}.npy"
    try:
        store.open(out)
        if npy.is_file():
            return out, npy
    except store.StoreError:
        pass
    t0 = time.perf_counter()
    mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(rows, 256, 384))
    s = store.create(out, attrs={"kind": "synthetic activations"}, overwrite=True)
    w = s.array_writer("h", (rows, 256, 384), "float16", compression="zstd")
    step = s.info("h").shards[0] if s.info("h").shards else 512
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((step, 256, 384), dtype=np.float32) * 0.5).astype(np.float16)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        block = base[: b - a] + np.float16(a % 7) * np.float16(0.01)  # cheap, not all-identical
        mm[a:b] = block
        w.write(a, block)
    mm.flush()
    del mm
    s.finalize()
    print(f"wrote synthetic activations {rows}x256x384 f16 in {time.perf_counter() - t0:.1f}s")
    return out, npy


def uncompressed_copy(work: Path, npy: Path) -> Path:
    """The same activations as an uncompressed store (`compression=None`), copied from the .npy."""
    mm = np.load(npy, mmap_mode="r")
    out = work / f"acts_{len(mm)}_raw.zarr"
    try:
        store.open(out)
        return out
    except store.StoreError:
        pass
    t0 = time.perf_counter()
    s = store.create(out, attrs={"kind": "synthetic activations, uncompressed"}, overwrite=True)
    w = s.array_writer("h", mm.shape, mm.dtype, compression=None)
    step = s.info("h").shards[0] if s.info("h").shards else 512
    for a in range(0, len(mm), step):
        w.write(a, np.ascontiguousarray(mm[a : a + step]))
    s.finalize()
    print(f"wrote uncompressed activations in {time.perf_counter() - t0:.1f}s")
    return out


# ----------------------------------------------------------------------------- readers


def bench_dataset(name: str, path: Path, arrays: list[str], draw: list[str], npys: dict[str, np.ndarray],
                  batch: int, budget: float, threads: int) -> dict:
    s = store.open(path)
    k = 0  # epoch 0 -> draw 0
    row_bytes = {}
    for a in arrays:
        info = s.info(a)
        rb = info.nbytes // info.shape[0]
        row_bytes[a] = rb // info.shape[1] if a in draw else rb
    sample_bytes = sum(row_bytes.values())
    stream = BatchStream(path, arrays, batch, seed=0, draw=draw, threads=threads)
    order = stream.order(0)
    batches = [order[i : i + batch].astype(np.int64) for i in range(0, len(order) - batch + 1, batch)]
    res: dict = {"arrays": arrays, "draw": draw, "batch_size": batch, "num_samples": len(order),
                 "bytes_per_sample": sample_bytes, "plan": stream.plan,
                 "stored_MB": round(sum(s.info(a).nbytes_stored for a in arrays) / 1e6, 1),
                 "decoded_MB": round(sum(s.info(a).nbytes for a in arrays) / 1e6, 1)}

    # BatchStream: whole epochs (first batch included) until the budget
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget:
        it = iter(stream)
        t1 = time.perf_counter()
        n += len(next(it)[INDEX])
        res.setdefault("batchstream_first_batch_s", round(time.perf_counter() - t1, 3))
        for b in it:
            n += len(b[INDEX])
            if time.perf_counter() - t0 > budget:
                break
        del it
    secs = time.perf_counter() - t0
    res["batchstream"] = rate(n, n * sample_bytes, secs)
    stream.close()

    def zarr_reader(cfg: dict):
        with zarr.config.set(cfg):
            za = {a: zarr.open_array(str(path / a), mode="r") for a in arrays}

        def read(i: int):
            idx = batches[i % len(batches)]
            with zarr.config.set(cfg):
                for a in arrays:
                    if a in draw:
                        za[a].oindex[idx, k]
                    else:
                        za[a].oindex[idx]
            return len(idx), len(idx) * sample_bytes
        return read

    for label, cfg in (("zarr_python", {}), ("zarr_python_zarrs", ZARRS)):
        try:
            res[label] = rate(*timed(zarr_reader(cfg), budget, len(batches)))
        except Exception as e:  # the zarrs pipeline may refuse a layout; report it
            res[label] = {"error": f"{type(e).__name__}: {e}"[:300]}

    # torch DataLoader over the uncompressed memmap (same batches; rows sorted per batch for the
    # memmap, then put back in batch order)
    class MemmapBatches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            idx = batches[i]
            out = {}
            for a, mm in npys.items():
                rows = mm[np.sort(idx)]
                out[a] = torch.from_numpy(rows[:, k] if a in draw else rows)
            return out

    for workers in (0, 2):
        dl = torch.utils.data.DataLoader(MemmapBatches(), batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
        t0, n = time.perf_counter(), 0
        for b in dl:
            n += len(next(iter(b.values())))
            if time.perf_counter() - t0 > budget:
                break
        secs = time.perf_counter() - t0
        res[f"torch_dataloader_memmap_w{workers}"] = rate(n, n * sample_bytes, secs)

    # the limit: copying the same bytes in memory (contiguous), and a gather of the same batches
    mem = {a: np.ascontiguousarray(mm[:, k] if a in draw else mm) for a, mm in npys.items()}
    total = sum(m.nbytes for m in mem.values())
    dst = {a: np.empty_like(m) for a, m in mem.items()}
    for a in mem:
        np.copyto(dst[a], mem[a])  # fault the pages in first
    best = float("inf")
    for _ in range(5):  # best of 5: the machine is shared
        t0 = time.perf_counter()
        for a in mem:
            np.copyto(dst[a], mem[a])
        best = min(best, time.perf_counter() - t0)
    res["memcpy"] = {"MB_per_s": round(total / best / 1e6, 1),
                     "samples_per_s": round(len(order) / best, 1)}
    del dst
    outs = {a: np.empty((batch, *m.shape[1:]), m.dtype) for a, m in mem.items()}

    def gather(i: int):
        idx = batches[i % len(batches)]
        for a in mem:
            np.take(mem[a], idx, axis=0, out=outs[a])
        return len(idx), len(idx) * sample_bytes

    res["memory_gather"] = rate(*timed(gather, min(budget, 3.0), 10 * len(batches)))
    bs = res["batchstream"]["MB_per_s"]
    res["ratios"] = {
        "batchstream_vs_zarr_python": _ratio(bs, res["zarr_python"]),
        "batchstream_vs_zarr_python_zarrs": _ratio(bs, res["zarr_python_zarrs"]),
        "batchstream_vs_dataloader_memmap_w0": _ratio(bs, res["torch_dataloader_memmap_w0"]),
        "batchstream_fraction_of_memcpy": round(bs / res["memcpy"]["MB_per_s"], 3),
    }
    print(name, json.dumps(res["ratios"]))
    return res


def _ratio(a: float, other: dict) -> float | None:
    return round(a / other["MB_per_s"], 2) if "MB_per_s" in other and other["MB_per_s"] else None


# ----------------------------------------------------------------------------- training wait


def training_wait(path: Path, steps: int, threads: int) -> dict:
    """Fraction of a ViT block step (MNIST recipe, block 0, CPU) spent waiting for the next batch."""
    from dbcore.kernels import block_loss_ce
    from dbcore.recipes.vit import ViTBlock

    cfg = config_mod.load(ROOT / "configs" / "vit_mnist.toml")
    m, t = cfg.model, cfg.train
    emb = torch.from_numpy(store.open(path).read(layout.TARGET_EMBEDDING))
    torch.manual_seed(0)
    model = ViTBlock(m, 0, emb)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr)
    stream = BatchStream.for_block(path, 0, t.batch_size, threads=threads)
    law = block_sigma_law(m.sigma_dist, 0, m.num_blocks, m.gamma)
    it = iter(stream)
    wait = total = 0.0
    done = 0
    t_step = time.perf_counter()
    while done < steps:
        t0 = time.perf_counter()
        b = next(it)
        t1 = time.perf_counter()
        x = torch.from_numpy(b[layout.IMAGES]).permute(0, 3, 1, 2).float() / 255.0
        labels = torch.from_numpy(b[layout.LABELS])
        noised = block_noise(b, emb[labels], 0, stream.epoch, law, seed=0)
        _, logits = model(x, noised.z, noised.sigma)
        loss = block_loss_ce(logits, labels, torch.ones_like(noised.sigma), backend="torch")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if done >= 3:  # warm-up steps apart
            wait, total = wait + (t1 - t0), total + (t2 - t0)
        done += 1
    stream.close()
    del t_step
    return {"recipe": "configs/vit_mnist.toml block 0 (CPU)", "batch_size": t.batch_size,
            "steps_measured": steps - 3, "step_ms": round(1000 * total / (steps - 3), 2),
            "wait_ms": round(1000 * wait / (steps - 3), 3), "wait_fraction": round(wait / total, 4),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "stream.json"))
    ap.add_argument("--workdir", default="/tmp/dbcore_bench_stream")
    ap.add_argument("--threads", type=int, default=None, help="BatchStream decode threads")
    ap.add_argument("--clean", action="store_true", help="delete the generated stores afterwards")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    budget = 3.0 if args.quick else 8.0
    threads = args.threads or min(4, os.cpu_count() or 1)
    t_all = time.perf_counter()
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()},
                    "versions": {p: version(p) for p in ("dbcore", "zarr", "zarrs", "numpy", "torch")},
                    "batchstream_threads": threads, "budget_s_per_reader": budget,
                    "note": "reads from the page cache; MB/s counts the bytes handed to the caller "
                            "(decoded, after draw selection)"}

    mpath = mnist_store(work)
    ms = store.open(mpath)
    b0 = [layout.IMAGES, layout.LABELS, layout.noised_z(0), layout.noised_sigma(0)]
    npys = {}
    for a in b0:
        f = work / f"mnist_{a}.npy"
        if not f.is_file():
            np.save(f, ms.read(a))
        npys[a] = np.load(f, mmap_mode="r")
    result["mnist_vit_b4_k4"] = bench_dataset("mnist", mpath, b0, b0[2:], npys, 256, budget, threads)

    rows = 2048 if args.quick else 11_000  # 11k x 196,608 B = 2.16 GB
    spath, npy = synthetic_store(work, rows)
    result["activations_f16_256x384"] = bench_dataset(
        "activations", spath, ["h"], [], {"h": np.load(npy, mmap_mode="r")}, 64, budget, threads)
    rpath = uncompressed_copy(work, npy)
    result["activations_f16_256x384_uncompressed"] = bench_dataset(
        "activations_uncompressed", rpath, ["h"], [], {"h": np.load(npy, mmap_mode="r")}, 64,
        budget, threads)

    result["training_wait"] = training_wait(mpath, 15 if args.quick else 40, threads)
    print("training wait", json.dumps(result["training_wait"]))
    result["targets"] = {
        "shuffled_vs_zarr_python_min_3x": {
            k: result[k]["ratios"]["batchstream_vs_zarr_python"]
            for k in ("mnist_vit_b4_k4", "activations_f16_256x384",
                      "activations_f16_256x384_uncompressed")},
        "uncompressed_activations_fraction_of_memcpy_min_0.5":
            result["activations_f16_256x384_uncompressed"]["ratios"]["batchstream_fraction_of_memcpy"],
        "zstd_activations_fraction_of_memcpy":
            result["activations_f16_256x384"]["ratios"]["batchstream_fraction_of_memcpy"],
        "training_wait_fraction_max_0.05": result["training_wait"]["wait_fraction"],
    }
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2), f"total {result['total_s']}s")
    if args.clean:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
