"""DiT quality: DiffusionBlocks beside the end-to-end baseline (same depth, steps, sampler), FID and
class accuracy over CFG scales and sampler steps, in one process on the same data.

    python benches/bench_dit.py --config configs/dit_mnist.toml --data mnist
Writes benches/results/<name>.json and .md. FID is the Frechet distance in the features of the
project's reference classifier (`dbcore.metrics.fid`), not comparable with Inception FID.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dbcore import __version__
from dbcore import config as config_mod
from dbcore.data.cache import write_cache
from dbcore.data.sources import load_source
from dbcore.runs.evaluate import evaluate
from dbcore.runs.train import train_run

ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "mnist": (f"npz:{ROOT.parent / 'shared/datasets/mnist/train.npz'}",
              f"npz:{ROOT.parent / 'shared/datasets/mnist/valid.npz'}"),
    "digits": ("digits:train", "digits:valid"),
    "fashion_mnist": (f"npz:{ROOT.parent / 'shared/datasets/fashion_mnist/train.npz'}",
                      f"npz:{ROOT.parent / 'shared/datasets/fashion_mnist/valid.npz'}"),
    "cifar10": (f"tar:{ROOT.parent / 'shared/datasets/cifar10/train-{00000..00002}.tar'}",
                f"tar:{ROOT.parent / 'shared/datasets/cifar10/valid-00000.tar'}"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/dit_mnist.toml"))
    ap.add_argument("--data", choices=sorted(DATA), default="mnist")
    ap.add_argument("--steps", type=int, default=None, help="training steps per block and for e2e")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--sampler-steps", type=int, nargs="+", default=[50, 20])
    ap.add_argument("--heun", action="store_true", help="also Heun at the first sampler-steps value")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/dbcore_dit")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=str(ROOT / "benches/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_mod.load(args.config)
    if args.steps:
        cfg.train.steps = args.steps
    train_src, valid_src = DATA[args.data]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "train.zarr"
    if not store.exists():
        write_cache(cfg, load_source(train_src), store, progress=False)
    timing = {}
    for kind in ("blocks", "e2e"):
        t0 = time.perf_counter()
        train_run(cfg, store, work / kind, e2e=kind == "e2e", progress=False)
        timing[kind] = round(time.perf_counter() - t0, 1)
    rows = []
    grid = [(s, n, "euler") for n in args.sampler_steps for s in args.scales]
    if args.heun:
        grid += [(s, args.sampler_steps[0], "heun") for s in args.scales]
    for scale, steps, sampler in grid:
        for kind in ("blocks", "e2e"):
            r = evaluate(work / kind, valid_src, steps, num_samples=args.num_samples, cfg_scale=scale,
                         sampler=sampler)
            rows.append({k: r[k] for k in ("kind", "fid", "class_accuracy", "fid_floor", "num_samples",
                                           "cfg_scale", "inference_steps", "sampler", "seconds")})
            print(json.dumps(rows[-1]), flush=True)
            write(args, cfg, rows, timing)


def write(args, cfg, rows, timing) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"dit_{args.data}"
    meta = {"dbcore": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "machine": platform.machine(), "threads": torch.get_num_threads(), "data": args.data,
            "config": cfg.to_dict(), "train_seconds": timing, "command": " ".join(sys.argv)}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [f"# DiT on {args.data}: DiffusionBlocks (B={cfg.model.num_blocks}) vs end-to-end, "
             f"{cfg.train.steps} steps each (`{meta['command']}`)", "",
             "FID: Frechet distance in the features of the project's reference classifier "
             "(`dbcore.metrics.fid`), not comparable with Inception FID. Floor: real training images.", "",
             "| CFG scale | sampler steps | sampler | DB FID | e2e FID | DB class acc | e2e class acc "
             "| floor |",
             "|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault((r["cfg_scale"], r["inference_steps"], r["sampler"]), {})[r["kind"]] = r
    for (s, n, smp), pair in by.items():
        db, e2e = pair.get("blocks", {}), pair.get("e2e", {})

        def f(r, k, fmt):
            return format(r[k], fmt) if k in r else "-"

        lines.append(f"| {s} | {n} | {smp} | {f(db, 'fid', '.2f')} | {f(e2e, 'fid', '.2f')} | "
                     f"{f(db, 'class_accuracy', '.4f')} | {f(e2e, 'class_accuracy', '.4f')} | "
                     f"{f(db, 'fid_floor', '.2f')} |")
    lines += ["", f"Training seconds: {timing}."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
