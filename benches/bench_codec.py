"""The data path's codec and layout, chosen by measurement.

1. Codecs on the chunks of float16 activations (the stream benchmark's: rows of 256 x 384,
   standard normal x 0.5) and of MNIST images (uint8), one thread, in memory (numcodecs):
   compressed size and encode / decode MB/s of uncompressed, zstd levels 1/3/9, and blosc
   (lz4 and zstd) with and without byte shuffle.
2. Shuffled batches of 64 from 4096 activation rows: `BatchStream` on the store's default layout
   (and on zstd, the former default, and an exact shuffle), zarr-python with the zarrs codec
   pipeline on one-sample chunks (its best case; uncompressed and zstd), and a gather of the
   same batches from memory. Same batches for every reader; all reads from the page cache.
3. With `--s3`: `BatchStream` on the same default-layout store at an s3:// URL served by moto on
   the loopback address (the object-store path's cost against a local S3 server written in
   Python: a floor for what a real bucket gives, not a measure of one).

Writes benches/results/codec.json.

    python benches/bench_codec.py [--rows 4096] [--budget 8] [--s3] [--out PATH] [--workdir DIR]
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

import numcodecs
import numpy as np
import zarr

from dbcore.data import store
from dbcore.data.stream import BatchStream
from dbcore.method.batch import INDEX

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "datasets" / "mnist" / "train.npz"
ZARRS = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
BATCH = 64
ROW_SHAPE = (256, 384)


def codecs() -> dict[str, numcodecs.abc.Codec | None]:
    blosc = numcodecs.Blosc
    return {
        "none": None,
        "zstd1": numcodecs.Zstd(level=1),
        "zstd3": numcodecs.Zstd(level=3),
        "zstd9": numcodecs.Zstd(level=9),
        "blosc_lz4": blosc("lz4", 5, blosc.NOSHUFFLE),
        "blosc_lz4_shuffle": blosc("lz4", 5, blosc.SHUFFLE),
        "blosc_zstd1_shuffle": blosc("zstd", 1, blosc.SHUFFLE),
    }


def activations(rows: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((rows, *ROW_SHAPE), dtype=np.float32) * 0.5).astype(np.float16)


def gelu_activations(images: np.ndarray, width: int = 1536) -> np.ndarray:
    """Activations with a network's structure: GELU(x W + b) of MNIST pixels under a seeded
    (Kaiming-uniform) linear layer, float16 (N, width)."""
    import torch

    torch.manual_seed(0)
    layer = torch.nn.Linear(784, width)
    x = torch.from_numpy(images.reshape(len(images), -1)).float() / 255.0
    with torch.no_grad():
        return torch.nn.functional.gelu(layer(x)).half().numpy()


def codec_table(name: str, data: np.ndarray, chunk_rows: int, budget: float) -> dict:
    """Size and one-thread speed of each codec over whole chunks of `data` (MB/s of raw bytes)."""
    numcodecs.blosc.set_nthreads(1)
    chunks = [np.ascontiguousarray(data[a:a + chunk_rows]) for a in range(0, len(data), chunk_rows)]
    raw = sum(c.nbytes for c in chunks)
    out = {"data": name, "dtype": str(data.dtype), "chunk_rows": chunk_rows, "raw_MB": round(raw / 1e6, 1)}
    for label, codec in codecs().items():
        if codec is None:
            out[label] = {"ratio": 1.0}
            continue
        t0, encoded = time.perf_counter(), [codec.encode(c) for c in chunks]
        enc_s = time.perf_counter() - t0
        size = sum(len(e) for e in encoded)
        t0, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - t0 < budget / 4:
            for e in encoded:
                codec.decode(e)
            n += 1
        dec_s = (time.perf_counter() - t0) / n
        out[label] = {"ratio": round(size / raw, 3), "encode_MB_per_s": round(raw / enc_s / 1e6, 1),
                      "decode_MB_per_s": round(raw / dec_s / 1e6, 1)}
    print(name, json.dumps({k: v for k, v in out.items() if isinstance(v, dict)}))
    return out


def write_store(path: Path | str, data: np.ndarray, compression: str | None | bool) -> Path:
    """`data` as array "h"; compression=False: the store's default for its dtype."""
    s = store.create(path, overwrite=True)
    kwargs = {} if compression is False else {"compression": compression}
    s.write_array("h", data, **kwargs)
    s.finalize()
    return path


def write_zarr_one_sample(path: Path, data: np.ndarray, compressed: bool) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    z = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, *data.shape[1:]),
                          compressors=[zarr.codecs.ZstdCodec(level=3)] if compressed else None)
    z[:] = data
    return path


def timed(fn, budget: float, limit: int) -> dict:
    t0, n, i = time.perf_counter(), 0, 0
    while i < limit and time.perf_counter() - t0 < budget:
        n += fn(i)
        i += 1
    secs = time.perf_counter() - t0
    return {"samples_per_s": round(n / secs, 1), "samples": n, "seconds": round(secs, 3)}


def stream_rate(path: Path | str, budget: float, shuffle: bool | str = True) -> dict:
    stream = BatchStream(path, ["h"], BATCH, seed=0, shuffle=shuffle)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget:
        for b in stream:
            n += len(b[INDEX])
            if time.perf_counter() - t0 > budget:
                break
    secs = time.perf_counter() - t0
    plan = stream.plan
    stream.close()
    return {"samples_per_s": round(n / secs, 1), "samples": n, "seconds": round(secs, 3), "plan": plan}


def batches_of(path: Path) -> list[np.ndarray]:
    order = BatchStream(path, ["h"], BATCH, seed=0).order(0)
    return [np.sort(order[i:i + BATCH]).astype(np.int64) for i in range(0, len(order) - BATCH + 1, BATCH)]


def read_rates(work: Path, data: np.ndarray, budget: float) -> dict:
    default = write_store(work / "default.zarr", data, False)
    zstd = write_store(work / "zstd.zarr", data, "zstd")
    batches = batches_of(default)
    info = store.open(default).info("h")
    res: dict = {"rows": len(data), "row_shape": list(ROW_SHAPE), "batch_size": BATCH,
                 "default_layout": {"compression": info.compression, "chunks": list(info.chunks),
                                    "shards": list(info.shards) if info.shards else None,
                                    "stored_MB": round(info.nbytes_stored / 1e6, 1)},
                 "batchstream_default": stream_rate(default, budget),
                 "batchstream_default_exact_shuffle": stream_rate(default, budget, "exact"),
                 "batchstream_zstd": stream_rate(zstd, budget)}
    for compressed in (False, True):
        path = write_zarr_one_sample(work / f"one_{compressed}.zarr", data, compressed)
        with zarr.config.set(ZARRS):
            z = zarr.open_array(str(path), mode="r")

            def read(i: int, z=z) -> int:
                idx = batches[i % len(batches)]
                z.oindex[idx]
                return len(idx)

            res[f"zarr_python_zarrs_one_sample_{'zstd' if compressed else 'none'}"] = timed(
                read, budget, 10 * len(batches))
    out = np.empty((BATCH, *ROW_SHAPE), data.dtype)

    def gather(i: int) -> int:
        np.take(data, batches[i % len(batches)], axis=0, out=out)
        return BATCH

    res["memory_gather"] = timed(gather, min(budget, 3.0), 100 * len(batches))
    bs = res["batchstream_default"]["samples_per_s"]
    peer = max(res["zarr_python_zarrs_one_sample_none"]["samples_per_s"],
               res["zarr_python_zarrs_one_sample_zstd"]["samples_per_s"])
    res["ratios"] = {"batchstream_default_vs_best_zarr_python_zarrs": round(bs / peer, 2),
                     "batchstream_default_fraction_of_memory_gather":
                         round(bs / res["memory_gather"]["samples_per_s"], 2),
                     "batchstream_default_vs_zstd": round(bs / res["batchstream_zstd"]["samples_per_s"], 2)}
    print(json.dumps(res["ratios"]))
    return res


def s3_rate(data: np.ndarray, budget: float) -> dict:
    """BatchStream from the default layout at an s3:// URL on a moto server (see the module docs)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    try:
        import s3fs

        s3fs.S3FileSystem().mkdir("bench")
        url = "s3://bench/acts.zarr"
        t0 = time.perf_counter()
        write_store(url, data, False)
        write_s = time.perf_counter() - t0
        return {"server": "moto (Python) on 127.0.0.1",
                "write_MB_per_s": round(data.nbytes / write_s / 1e6, 1),
                "batchstream_default": stream_rate(url, budget)}
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=8.0, help="seconds per reader")
    ap.add_argument("--s3", action="store_true", help="also stream the store from a moto S3 server")
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "codec.json")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dbcore_bench_codec"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = activations(args.rows)
    load_start = [round(x, 2) for x in os.getloadavg()]
    shuffled = read_rates(args.workdir, data, args.budget)
    chunk_rows = shuffled["default_layout"]["chunks"][0]
    result = {
        "benchmark": "codecs and layout of float activations (see benches/bench_codec.py)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "load_avg_at_start": load_start},
        "versions": {p: version(p) for p in ("dbcore", "zarr", "zarrs", "numcodecs", "numpy")},
        "codecs": [codec_table("activations_f16_256x384", data[:1024], chunk_rows, args.budget)],
        "shuffled_batches": shuffled,
    }
    if MNIST.is_file():
        with np.load(MNIST) as f:
            images = f["images"][:8192]
        result["codecs"].append(codec_table("mnist_uint8", images, 1337, args.budget))
        gelu = gelu_activations(images)
        result["codecs"].append(codec_table("mnist_gelu_f16", gelu, (1 << 20) // gelu[0].nbytes, args.budget))
    if args.s3:
        result["s3"] = s3_rate(data, args.budget)
        print("s3", json.dumps(result["s3"]))
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
