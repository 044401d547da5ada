"""Streaming a store from object storage against the bucket's own speed (issue: the setup of the
s3:// targets). An S3 server (moto, `tests/helpers/s3_server.py`) runs in its own process on the
loopback address and adds `--delay` seconds (default 20 ms, a bucket's first-byte latency) to every
request, counting requests by method. On it, a 256 MiB float16 store in the default layout:

- the bucket's speed: every object of the store downloaded by 16 parallel GETs (boto3);
- epoch 1 of a shuffled `BatchStream` from `s3://`, in a new process with an empty disk cache;
- epoch 2 in another new process, served by the disk cache;
- the same epoch of the same store on local disk (a new process, page cache warm);
- epoch 1 with a cache of half the store (the shard-aware order: shards shuffled, rows within
  windows of shards), into an empty cache;
- epoch 1 with the disk cache off (`DBCORE_CACHE_LIMIT=0`: ranged reads, the earlier path).

Each epoch is checked to be a permutation of the rows. Every measurement but the last is repeated
`--repeats` times (epoch 1 into an empty cache each time) and its median compared. Targets: epoch 1
<= 2x the download with at most objects + bytes / 4 MiB requests; epoch 2 <= 2x the local epoch.
Writes benches/results/s3_stream.json.

    python benches/bench_s3.py [--mib 256] [--delay 0.02] [--repeats 3] [--out PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from s3_server import environment  # noqa: E402

BUCKET = "dbcore-bench"
ROW = 1024  # float16 values per row (2 KiB)
BATCH = 256

EPOCH = """
import json, sys, time
import numpy as np
from dbcore.data.stream import BatchStream
from dbcore.method.batch import INDEX
t0 = time.perf_counter()
seen = [b[INDEX] for b in BatchStream(sys.argv[1], ["x"], batch_size=int(sys.argv[2]), seed=0)]
secs = time.perf_counter() - t0
seen = np.concatenate(seen)
print(json.dumps({"seconds": secs, "rows": int(seen.size),
                  "permutation": bool(np.array_equal(np.sort(seen), np.arange(seen.size)))}))
"""


def start_server(delay: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "s3_server.py"), str(delay)],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def counts(endpoint: str, reset: bool = False) -> dict[str, int]:
    path, method = ("reset", "POST") if reset else ("counts", "GET")
    req = urllib.request.Request(f"{endpoint}/__{path}", method=method)
    return json.loads(urllib.request.urlopen(req).read())


def epoch(url: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", EPOCH, url, str(BATCH)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--delay", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "s3_stream.json")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dbcore_bench_s3"))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    proc, endpoint = start_server(args.delay)
    try:
        env = {**os.environ, **environment(endpoint), "DBCORE_CACHE_DIR": str(args.workdir / "cache")}
        os.environ.update(env)
        import boto3

        from dbcore.data import store

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        rows = args.mib * (1 << 20) // (2 * ROW)
        x = np.random.default_rng(0).standard_normal((rows, ROW)).astype(np.float16)
        url, local = f"s3://{BUCKET}/acts.zarr", args.workdir / "acts.zarr"
        for where in (url, local):
            s = store.create(where, overwrite=True)
            s.write_array("x", x)
            s.finalize()
        del x
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="acts.zarr/")["Contents"]]
        nbytes = sum(o["Size"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="acts.zarr/")["Contents"])

        def get(key: str) -> int:
            return len(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

        get(keys[0])  # a warm connection pool, as the stream's
        downloads = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                assert sum(pool.map(get, keys)) == nbytes
            downloads.append(time.perf_counter() - t0)
        download = float(np.median(downloads))

        def measure(name: str, where: str, extra: dict[str, str], repeats: int, fresh: bool) -> dict:
            """The median of `repeats` epochs, each in a new process (`fresh`: an empty cache each)."""
            runs = []
            for i in range(repeats):
                counts(endpoint, reset=True)
                cache = {"DBCORE_CACHE_DIR": str(args.workdir / f"cache-{name}-{i}")} if fresh else {}
                r = epoch(where, {**env, **extra, **cache})
                r["requests"] = counts(endpoint)
                r["num_requests"] = sum(r["requests"].values())
                runs.append(r)
                if fresh and i < repeats - 1:  # dirty pages of earlier caches must not slow later runs
                    shutil.rmtree(cache["DBCORE_CACHE_DIR"])
            median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
            return {**median, "all_seconds": [round(r["seconds"], 4) for r in runs],
                    "permutation": all(r["permutation"] for r in runs)}

        results = {}
        for name, where, extra, repeats, fresh in [
                ("epoch1_s3", url, {}, args.repeats, True),
                ("epoch2_s3_new_process", url, {}, args.repeats, False),  # the last epoch 1's cache
                ("epoch_local", str(local), {}, args.repeats, False),
                ("epoch1_s3_cache_half", url, {"DBCORE_CACHE_LIMIT": str(nbytes // 2)}, 1, True),
                ("epoch1_s3_cache_off", url, {"DBCORE_CACHE_LIMIT": "0"}, 1, False)]:
            if name == "epoch2_s3_new_process":
                env["DBCORE_CACHE_DIR"] = str(args.workdir / f"cache-epoch1_s3-{args.repeats - 1}")
            results[name] = measure(name, where, extra, repeats, fresh)
            print(name, json.dumps(results[name]))
        budget = len(keys) + nbytes / (4 << 20)
        e1, e2, loc = results["epoch1_s3"], results["epoch2_s3_new_process"], results["epoch_local"]
        summary = {
            "download_all_objects_s": round(download, 3),
            "download_all_seconds": [round(d, 4) for d in downloads],
            "epoch1_over_download": round(e1["seconds"] / download, 2),
            "epoch1_requests": e1["num_requests"], "request_budget": int(budget),
            "epoch2_over_local": round(e2["seconds"] / loc["seconds"], 2),
            "cache_off_over_download": round(results["epoch1_s3_cache_off"]["seconds"] / download, 2),
            "cache_half_over_download": round(results["epoch1_s3_cache_half"]["seconds"] / download, 2),
            "cache_half_requests": results["epoch1_s3_cache_half"]["num_requests"],
            "permutations": all(r["permutation"] and r["rows"] == rows for r in results.values()),
        }
        summary["targets"] = {"epoch1 <= 2x download": summary["epoch1_over_download"] <= 2,
                              "epoch1 requests <= objects + bytes/4MiB": e1["num_requests"] <= budget,
                              "epoch2 <= 2x local": summary["epoch2_over_local"] <= 2,
                              "exact permutations": summary["permutations"]}
        report = {"bench": "s3_stream", "machine": platform.platform(), "cpus": os.cpu_count(),
                  "setup": {"MiB": args.mib, "rows": rows, "row_bytes": 2 * ROW, "batch_size": BATCH,
                            "delay_s": args.delay, "objects": len(keys), "bytes": nbytes,
                            "repeats": args.repeats,
                            "shuffle": "chunks (the default)"},
                  "summary": summary, "runs": results}
        print(json.dumps(summary, indent=1))
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.out)
    finally:
        proc.terminate()
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
