"""Blocks as Ray tasks against one process training them in turn: wall-clock of the whole command.

Both runs train every block of the config for `--steps` steps with one torch thread per block:
`dbcore train` in one process (the blocks one after another), then `dbcore train --ray` with the
local Ray instance it starts (as many CPUs as the machine has; Ray's start-up and shutdown
included), one CPU per block task. The weights must be
the same; the ratio of the wall-clocks is the figure.

    python benches/bench_ray.py configs/vit_mnist.toml --steps 300 --workdir /tmp/ray_bench \\
        --json benches/results/ray_vit_mnist.json
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
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def timed(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dbcore.cli", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--data", default=f"npz:{SHARED / 'train.npz'}")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    import ray

    from dbcore import config as config_mod
    from dbcore.runs import checkpoint

    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    store = w / "store"
    if not store.exists():
        subprocess.run([sys.executable, "-m", "dbcore.cli", "cache", args.config, "--data", args.data,
                        "--out", str(store)], check=True, stdout=subprocess.DEVNULL)
    cfg = config_mod.load(args.config)
    text = Path(args.config).read_text()
    one_thread = w / "one_thread.toml"  # every block with one torch thread, in both runs
    one_thread.write_text(text.replace("[train]", "[train]\nthreads = 1", 1) if "threads" not in text
                          else text)
    for run in ("serial", "ray"):
        shutil.rmtree(w / run, ignore_errors=True)
    common = ["train", str(one_thread), "--store", str(store), "--steps", str(args.steps), "--quiet"]
    serial = timed(*common, "--out", str(w / "serial"))
    ray_s = timed(*common, "--out", str(w / "ray"), "--ray", "--cpus-per-block", "1")
    same = all(
        all(torch.equal(a[k], b[k]) for k in a)
        for a, b in ((checkpoint.load(w / "serial" / f"block{i}", "model.")[0],
                      checkpoint.load(w / "ray" / f"block{i}", "model.")[0])
                     for i in range(cfg.model.num_blocks)))
    result = {"config": args.config, "steps": args.steps, "num_blocks": cfg.model.num_blocks,
              "serial_s": round(serial, 2), "ray_s": round(ray_s, 2),
              "ray_over_serial": round(ray_s / serial, 3), "target": 0.6, "same_weights": same,
              "ray": ray.__version__, "torch": torch.__version__, "cpus": os.cpu_count(),
              "machine": platform.platform()}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
