"""Image sources as users keep them: the same images from three layouts, and caching a large sharded
set in bounded memory.

1. `layouts`: the first `--layout-images` samples of CIFAR-10's first training shard written as
   WebDataset shards, class folders and Parquet files (the `datasets` layout), each cached with
   `configs/vit_cifar10.toml`; the three stores compared per class (rows sorted, since a folder
   source is in class order), and the tar store against a plain Pillow decode of the same JPEGs.
2. `large`: `--large-images` 64x64 JPEGs (CIFAR-10 upscaled, each in one of 8 crops and flips,
   quality 95) in `--shards` shards, cached by `dbcore cache` in a child process whose peak RssAnon
   is sampled; its images per second against a one-thread Pillow loop that only decodes the same
   JPEGs (from memory, shard after shard).

    python benches/bench_image_sources.py --workdir /tmp/imgsrc --json benches/results/image_sources.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LARGE_TOML = """[model]
recipe = "vit"
image_size = 64
channels = 3
patch_size = 8
dim = 32
depth = 2
heads = 2
num_classes = 10
num_blocks = 2

[train]
steps = 1
"""


def cifar_samples(n: int) -> list[tuple[str, bytes, int]]:
    """(key, JPEG bytes, label) of the first n samples of the first training shard."""
    out, pending = [], {}
    with tarfile.open(CIFAR / "train-00000.tar") as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            pending.setdefault(key, {})[ext] = tar.extractfile(m).read()
            if len(pending[key]) == 2:
                parts = pending.pop(key)
                out.append((key, parts["jpg"], int(parts["cls"])))
                if len(out) == n:
                    break
    return out


def write_tar(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data, label in samples:
            for name, blob in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def cached(spec: str, out: Path) -> tuple[np.ndarray, np.ndarray, float]:
    from dbcore import api
    from dbcore.data import store

    cfg = api.config(ROOT / "configs/vit_cifar10.toml")
    t0 = time.perf_counter()
    api.cache(cfg, spec, out, overwrite=True)
    seconds = time.perf_counter() - t0
    s = store.open(out)
    return s.read("images"), s.read("labels"), seconds


def by_class(images: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Each class's images, rows in byte order (an order-free comparison)."""
    out = {}
    for c in np.unique(labels):
        rows = images[labels == c].reshape(int((labels == c).sum()), -1)
        out[int(c)] = rows[np.lexsort(rows.T[::-1])]
    return out


def layouts(workdir: Path, n: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = cifar_samples(n)
    half = n // 2
    (workdir / "tar").mkdir(parents=True, exist_ok=True)
    write_tar(workdir / "tar" / "part-00000.tar", samples[:half])
    write_tar(workdir / "tar" / "part-00001.tar", samples[half:])
    for key, data, label in samples:
        (workdir / "folder" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        (workdir / "folder" / CLASSES[label] / f"{key}.jpg").write_bytes(data)
    (workdir / "parquet").mkdir(exist_ok=True)
    for i, part in enumerate((samples[:half], samples[half:])):
        images = pa.array([{"bytes": d, "path": f"{k}.jpg"} for k, d, _ in part])
        pq.write_table(pa.table({"image": images, "label": pa.array([y for _, _, y in part], pa.int64())}),
                       workdir / "parquet" / f"train-{i:05d}.parquet")
    stores = {kind: cached(spec, workdir / f"{kind}.zarr") for kind, spec in (
        ("tar", f"tar:{workdir}/tar/part-{{00000..00001}}.tar"), ("folder", f"folder:{workdir}/folder"),
        ("parquet", f"parquet:{workdir}/parquet/*.parquet"))}
    ref = by_class(*stores["tar"][:2])
    identical = {kind: all(np.array_equal(ref[c], rows) for c, rows in by_class(*stores[kind][:2]).items())
                 and set(by_class(*stores[kind][:2])) == set(ref) for kind in stores}
    pillow = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for _, d, _ in samples])
    diff = np.abs(stores["tar"][0].astype(np.int16) - pillow)
    return {"images": n, "identical_per_class_to_tar": identical,
            "seconds": {kind: round(v[2], 2) for kind, v in stores.items()},
            "vs_pillow": {"mean_abs_diff": round(float(diff.mean()), 4), "max_abs_diff": int(diff.max()),
                          "within_one_level": round(float((diff <= 1).mean()), 6),
                          "per_image_mean_max": round(float(diff.reshape(n, -1).mean(1).max()), 4)},
            "target": "identical per class; within one grey level of Pillow (mean abs difference)",
            "met": all(identical.values()) and float(diff.mean()) <= 1.0}


def make_large(folder: Path, n: int, shards: int) -> list[Path]:
    """n 64x64 JPEGs from CIFAR-10 (8 crops/flips of each upscaled image), in `shards` shards."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"large-{i:05d}.tar" for i in range(shards)]
    if all(p.is_file() for p in paths):
        return paths
    base = [(d, y) for _, d, y in cifar_samples(15000)]
    per = -(-n // shards)
    i = 0
    for path in paths:
        with tarfile.open(path, "w") as tar:
            for _ in range(min(per, n - i)):
                data, label = base[i % len(base)]
                variant = i // len(base)
                im = Image.open(io.BytesIO(data)).convert("RGB").resize((72, 72), Image.Resampling.BICUBIC)
                dx, dy = (variant % 4) * 2, (variant // 4 % 2) * 4
                im = im.crop((dx, dy, dx + 64, dy + 64))
                if variant % 2:
                    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=95)
                for name, blob in ((f"{i:07d}.jpg", buf.getvalue()), (f"{i:07d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                i += 1
    return paths


def pillow_loop(paths: list[Path]) -> tuple[int, float]:
    """(images, seconds) of one thread decoding every JPEG, read into memory shard by shard first."""
    n, seconds = 0, 0.0
    for path in paths:
        with tarfile.open(path) as tar:
            blobs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
        t0 = time.perf_counter()
        for data in blobs:
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        seconds += time.perf_counter() - t0
        n += len(blobs)
    return n, seconds


def large(workdir: Path, n: int, shards: int) -> dict:
    from dbcore.runs.process_memory import peak_rss_anon

    paths = make_large(workdir / "large", n, shards)
    jpeg_bytes = sum(p.stat().st_size for p in paths)
    cfg = workdir / "large.toml"
    cfg.write_text(LARGE_TOML)
    cmd = [sys.executable, "-m", "dbcore.cli", "cache", str(cfg), "--data",
           f"tar:{workdir}/large/large-*.tar", "--out", str(workdir / "large.zarr"), "--overwrite"]
    t0 = time.perf_counter()
    peak = peak_rss_anon(cmd)
    seconds = time.perf_counter() - t0
    images, pillow_seconds = pillow_loop(paths)
    rate, pillow_rate = images / seconds, images / pillow_seconds
    return {"images": images, "shards": shards, "jpeg_bytes": jpeg_bytes,
            "decoded_bytes": images * 64 * 64 * 3,
            "cache_seconds": round(seconds, 1), "cache_images_per_s": round(rate, 1),
            "pillow_one_thread_decode_images_per_s": round(pillow_rate, 1),
            "ratio": round(rate / pillow_rate, 2), "peak_rss_anon_mib": round(peak / 2**20, 1),
            "targets": {"peak_rss_anon_mib": 1024, "ratio": 1.5},
            "met": peak <= 2**30 and rate >= 1.5 * pillow_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/dbcore_image_sources")
    ap.add_argument("--layout-images", type=int, default=10_000)
    ap.add_argument("--large-images", type=int, default=160_000)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--json", default=str(ROOT / "benches/results/image_sources.json"))
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(sys.argv), "cpus": os.cpu_count(),
              "layouts": layouts(workdir, args.layout_images),
              "large": large(workdir, args.large_images, args.shards)}
    print(json.dumps(report, indent=2))
    out = Path(args.json)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
