"""How to decode images (JPEG/PNG/WebP) in parallel: Pillow from Python in a pool, or the Rust
extension (`dbcore._native.decode_images`, rust/src/decode.rs).

Same work for every method: decode, convert to RGB, resize so the shorter side is S (Pillow
BICUBIC with reducing_gap=None; the extension: `image` (zune-jpeg) decodes, fast_image_resize
Catmull-Rom resizes; both antialiased), centre-crop to SxS, write into one preallocated uint8
array. Encoded bytes are read into memory first (not timed).

Methods: Pillow on 1 thread; Pillow in a ThreadPoolExecutor and in a ProcessPoolExecutor with
os.cpu_count() workers (chunks of 256 images; the process pool's timings include shipping the
bytes in and the pixels back); the extension on one thread (a child process with
RAYON_NUM_THREADS=1) and on every core; `dbcore.data.decode.decode_batches`, what `dbcore cache`
runs (chunks of 256 handed to the extension from a thread pool). Extra, large case only: Pillow on
1 thread with `draft` (libjpeg DCT scaling, so a different, cheaper result).

Cases: (i) the CIFAR-10 shard's 32x32 JPEGs at S=32 (no resize); (ii) 1,000 256x256 JPEGs
(quality 90, CIFAR images upscaled) at S=64. Median of --repeats timings (methods interleaved, after
one warm-up round). Also reports the mean absolute pixel difference between Pillow and Rust outputs.

Writes benches/results/decode.json.

    python benches/bench_decode.py [--shard TAR] [--repeats 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
import PIL
import tomllib
from PIL import Image, features

from dbcore import _native
from dbcore.data.decode import ImageFormat, decode_batches
from dbcore.data.image_records import Record

ROOT = Path(__file__).resolve().parents[1]
SHARD = ROOT.parent / "shared" / "datasets" / "cifar10" / "train-00000.tar"
EXTS = (".jpg", ".jpeg", ".png", ".webp")
CHUNK = 256
LARGE_N, LARGE_SIDE, LARGE_S = 1000, 256, 64


def read_images(path: Path) -> list[bytes]:
    """Encoded image members of a tar, in archive order."""
    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read() for m in tar if m.isfile() and m.name.lower().endswith(EXTS)]


def fit(data: bytes, s: int, draft: bool = False) -> Image.Image:
    """Decode, convert to RGB, resize the shorter side to `s`, centre-crop to s x s."""
    im = Image.open(io.BytesIO(data))
    if draft:
        im.draft("RGB", (s, s))
    if im.mode != "RGB":
        im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (s, s):
        nw, nh = (s, (h * s + w // 2) // w) if w <= h else ((w * s + h // 2) // h, s)
        im = im.resize((max(nw, s), max(nh, s)), Image.Resampling.BICUBIC, reducing_gap=None)
        x0, y0 = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((x0, y0, x0 + s, y0 + s))
    return im


def decode_into(blobs: list[bytes], s: int, out: np.ndarray, draft: bool = False) -> None:
    for i, data in enumerate(blobs):
        out[i] = fit(data, s, draft)


def decode_chunk(blobs: list[bytes], s: int) -> np.ndarray:
    """Process-pool worker: a chunk's pixels, pickled back to the parent."""
    out = np.empty((len(blobs), s, s, 3), np.uint8)
    decode_into(blobs, s, out)
    return out


def pillow_1t(blobs: list[bytes], s: int, out: np.ndarray, draft: bool = False) -> float:
    t = time.perf_counter()
    decode_into(blobs, s, out, draft)
    return time.perf_counter() - t


def pillow_threads(pool: ThreadPoolExecutor, blobs: list[bytes], s: int, out: np.ndarray) -> float:
    t = time.perf_counter()
    starts = range(0, len(blobs), CHUNK)
    list(pool.map(lambda i: decode_into(blobs[i : i + CHUNK], s, out[i : i + CHUNK]), starts))
    return time.perf_counter() - t


def pillow_procs(pool: ProcessPoolExecutor, blobs: list[bytes], s: int, out: np.ndarray) -> float:
    t = time.perf_counter()
    starts = range(0, len(blobs), CHUNK)
    chunks = (blobs[i : i + CHUNK] for i in starts)
    for i, pixels in zip(starts, pool.map(decode_chunk, chunks, repeat(s)), strict=True):
        out[i : i + len(pixels)] = pixels
    return time.perf_counter() - t


def extension(blobs: list[bytes], s: int, out: np.ndarray) -> float:
    t = time.perf_counter()
    failed = _native.decode_images(blobs, s, 3, out)
    assert not failed, failed[:3]
    return time.perf_counter() - t


def extension_1t(tar: Path, s: int) -> float:
    """The extension's decode seconds in a child process whose thread pool has one thread."""
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--extension-seconds", str(tar), str(s)]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()[-1])


def pipeline(blobs: list[bytes], s: int, out: np.ndarray) -> float:
    t = time.perf_counter()
    done = 0
    for images, _ in decode_batches((Record(d, 0, "") for d in blobs), ImageFormat(s, 3)):
        out[done:done + len(images)] = images
        done += len(images)
    return time.perf_counter() - t


def make_large(src: list[bytes], path: Path) -> None:
    """LARGE_N JPEGs at LARGE_SIDE x LARGE_SIDE, quality 90, upscaled from the CIFAR images."""
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(src[:LARGE_N]):
            im = (
                Image.open(io.BytesIO(data))
                .convert("RGB")
                .resize((LARGE_SIDE,) * 2, Image.Resampling.BICUBIC)
            )
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)


def run_case(tar: Path, s: int, repeats: int, draft: bool, tmp: Path) -> dict:
    """images/s of every method on one tar, ratios vs Pillow on 1 thread, and Pillow/Rust diff."""
    blobs = read_images(tar)
    n, cpus = len(blobs), os.cpu_count() or 1
    out, drafted, ext_out = (np.empty((n, s, s, 3), np.uint8) for _ in range(3))
    with ThreadPoolExecutor(cpus) as threads, ProcessPoolExecutor(cpus) as procs:
        methods: dict[str, Callable[[], float]] = {
            "pillow_1t": lambda: pillow_1t(blobs, s, out),
            "pillow_threads": lambda: pillow_threads(threads, blobs, s, out),
            "pillow_procs": lambda: pillow_procs(procs, blobs, s, out),
            "extension_1t": lambda: extension_1t(tar, s),
            f"extension_{cpus}t": lambda: extension(blobs, s, ext_out),
            "dbcore_decode_batches": lambda: pipeline(blobs, s, ext_out),
        }
        if draft:
            methods["pillow_1t_draft"] = lambda: pillow_1t(blobs, s, drafted, draft=True)
        times: dict[str, list[float]] = {k: [] for k in methods}
        for r in range(repeats + 1):
            for k, fn in methods.items():
                seconds = fn()
                if r:  # round 0 warms up: imports, pool workers, page faults
                    times[k].append(seconds)
    seconds = {k: statistics.median(v) for k, v in times.items()}

    extension(blobs, s, ext_out)
    diff = np.abs(out.astype(np.int16) - ext_out)
    result = {
        "images": n,
        "size": s,
        "images_per_s": {k: round(n / v, 1) for k, v in seconds.items()},
        "ratio_vs_pillow_1t": {k: round(seconds["pillow_1t"] / v, 2) for k, v in seconds.items()},
        "mean_abs_diff_pillow_vs_extension": round(float(diff.mean()), 4),
        "max_abs_diff_pillow_vs_extension": int(diff.max()),
        "within_one_level_pillow_vs_extension": round(float((diff <= 1).mean()), 4),
    }
    if draft:
        result["mean_abs_diff_pillow_draft_vs_full"] = round(
            float(np.abs(drafted.astype(np.int16) - out).mean()), 4
        )
    return result


def versions() -> dict:
    lock = tomllib.loads((ROOT / "Cargo.lock").read_text())
    crates = {p["name"]: p["version"] for p in lock["package"]}
    return {
        "pillow": PIL.__version__,
        "libjpeg": features.version("jpg"),
        "libjpeg_turbo": features.check_feature("libjpeg_turbo"),
        "libwebp": features.version("webp"),
        "numpy": np.__version__,
        "crates": {k: crates[k] for k in ("image", "zune-jpeg", "fast_image_resize", "png", "image-webp")
                   if k in crates},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", type=Path, default=SHARD)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "decode.json")
    parser.add_argument("--extension-seconds", nargs=2, metavar=("TAR", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.extension_seconds:  # the child of `extension_1t`
        blobs, s = read_images(Path(args.extension_seconds[0])), int(args.extension_seconds[1])
        print(extension(blobs, s, np.empty((len(blobs), s, s, 3), np.uint8)))
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cifar = run_case(args.shard, 32, args.repeats, False, tmp)
        print("cifar_32:", json.dumps(cifar), flush=True)
        make_large(read_images(args.shard), tmp / "large.tar")
        large = run_case(tmp / "large.tar", LARGE_S, args.repeats, True, tmp)
        print(f"large_{LARGE_SIDE}_to_{LARGE_S}:", json.dumps(large), flush=True)

    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "versions": versions(),
        "repeats": args.repeats,
        "chunk": CHUNK,
        "cases": {"cifar_32": cifar, f"large_{LARGE_SIDE}_to_{LARGE_S}": large},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, suffix=".tmp", delete=False) as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(f.name, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
