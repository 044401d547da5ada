"""Decoding speed of a language-model run beside its baseline: characters generated per second,
both KV-cached, one thread, timed in alternating rounds (medians) so machine noise hits both alike.

    python benches/bench_lm_speed.py RUN_BLOCKS RUN_E2E --num 8 --length 64 --rounds 5 \\
        --json benches/results/arlm_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dbcore.runs.evaluate import sample_text_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("blocks", type=Path)
    ap.add_argument("e2e", type=Path)
    ap.add_argument("--num", type=int, default=8, help="texts decoded together (the batch)")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sampler", default=None, help="the blocks' chain (default: the run's config)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    options = {"num": args.num, "length": args.length, "prompt": args.prompt, "seed": 0}
    sampler = {"sampler": args.sampler} if args.sampler else {}
    new_chars = args.num * (args.length - len(args.prompt))
    times: dict[str, list[float]] = {"blocks": [], "e2e": []}
    for r in range(args.rounds + 1):
        for kind, run in (("blocks", args.blocks), ("e2e", args.e2e)):
            t0 = time.perf_counter()
            sample_text_run(run, {**options, **(sampler if kind == "blocks" else {})})
            if r:  # round 0 warms up
                times[kind].append(time.perf_counter() - t0)
    speed = {k: new_chars / statistics.median(v) for k, v in times.items()}
    result = {"blocks": str(args.blocks), "e2e": str(args.e2e), "num": args.num, "length": args.length,
              "threads": args.threads, "rounds": args.rounds, "sampler": args.sampler, "seconds": times,
              "chars_per_second": speed, "speed_ratio": speed["blocks"] / speed["e2e"],
              "meta": {"torch": torch.__version__, "machine": platform.machine()}}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"chars_per_second": speed, "speed_ratio": result["speed_ratio"]}))


if __name__ == "__main__":
    main()
