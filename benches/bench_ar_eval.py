"""The AR chain's held-out BPC: the stratified estimate beside `eval --exact` and the end-to-end eval.

Two measurements over trained runs of one config (the blocks and the `--e2e` baseline):
- cost: `eval` of the baseline (timed `--e2e-repeats` times, the median kept: it is short and
  its time varies most) and the blocks' stratified eval at each `--full-strata` (default: the
  config's) on the whole held-out text, in this process, one after the other (ratio blocks / e2e);
- error: on the first `--windows` held-out windows, the exact sum (`exact=True`) and the
  stratified estimate at each `--strata HEAD,TAIL` (readouts per level 1 + HEAD + TAIL), each
  with its BPC difference from the exact figure and its time.

    python benches/bench_ar_eval.py --blocks RUN --e2e RUN --windows 256 \\
        --strata 1,1 1,2 2,2 2,3 3,4 7,8 --full-strata 1,2 2,2 2,3 --json benches/results/arlm_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dbcore import api

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "shakespeare"
KEEP = ("bpb", "bits_per_token", "bits_per_token_stderr", "num_windows", "num_tokens", "estimator",
        "eval_head", "eval_tail", "seconds")


def timed(run: Path, data: str, **options) -> dict:
    t0 = time.perf_counter()
    r = api.evaluate(run, data, **options)
    return {**{k: r.get(k) for k in KEEP}, "wall_seconds": round(time.perf_counter() - t0, 3)}


def _pair(setting: str) -> tuple[int, int]:
    head, tail = (int(v) for v in setting.split(","))
    return head, tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=Path, required=True, help="a trained AR DiffusionBlocks run")
    ap.add_argument("--e2e", type=Path, required=True, help="its end-to-end run (same config)")
    ap.add_argument("--valid-text", default=str(SHARED / "valid.txt"))
    ap.add_argument("--windows", type=int, default=256, help="held-out windows of the exact comparison")
    ap.add_argument("--strata", nargs="+", default=["3,4"], help="HEAD,TAIL settings to compare")
    ap.add_argument("--full-strata", nargs="*", default=[], help="HEAD,TAIL settings on the whole text")
    ap.add_argument("--e2e-repeats", type=int, default=3, help="times the baseline's eval is timed (median)")
    ap.add_argument("--skip-full", action="store_true", help="only the comparison with the exact sum")
    ap.add_argument("--skip-exact", action="store_true",
                    help="no exact sum (its cost grows with the vocabulary): the strata, and the baseline "
                         "on the same windows")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    data = f"text:{args.valid_text}"
    out: dict = {"command": "python benches/bench_ar_eval.py " + " ".join(sys.argv[1:]),
                 "blocks": str(args.blocks), "e2e": str(args.e2e), "data": data}
    if not args.skip_full:
        repeats = [timed(args.e2e, data) for _ in range(args.e2e_repeats)]  # the cheap, noisy denominator
        e2e = {**sorted(repeats, key=lambda r: r["seconds"])[len(repeats) // 2],
               "seconds_each": [r["seconds"] for r in repeats]}
        out["full"] = {"e2e": e2e, "blocks": []}
        for setting in args.full_strata or [None]:
            strata = {} if setting is None else dict(zip(("eval_head", "eval_tail"), _pair(setting),
                                                         strict=True))
            r = timed(args.blocks, data, sampler="ancestral", **strata)
            out["full"]["blocks"].append({**r, "seconds_ratio": round(r["seconds"] / e2e["seconds"], 2),
                                          "wall_ratio": round(r["wall_seconds"] / e2e["wall_seconds"], 2)})
            print(json.dumps(out["full"]["blocks"][-1]), flush=True)
    exact = None
    if not args.skip_exact:
        exact = timed(args.blocks, data, sampler="ancestral", num_samples=args.windows, exact=True)
    rows = []
    for setting in args.strata:
        head, tail = _pair(setting)
        r = timed(args.blocks, data, sampler="ancestral", num_samples=args.windows, eval_head=head,
                  eval_tail=tail)
        if exact is not None:
            r.update(bits_minus_exact=round(r["bits_per_token"] - exact["bits_per_token"], 4),
                     seconds_vs_exact=round(r["seconds"] / exact["seconds"], 3))
        rows.append(r)
        print(json.dumps(rows[-1]), flush=True)
    out["comparison"] = {"windows": args.windows, "exact": exact, "stratified": rows,
                         "e2e": timed(args.e2e, data, num_samples=args.windows)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")  # complete, then in place (as bench_process_memory.py)
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(args.json)


if __name__ == "__main__":
    main()
