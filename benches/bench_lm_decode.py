"""Decoding levers of a trained language-model run, without retraining: held-out BPC of the chain
for several Euler step counts and readouts (the last step's logits or the product of every step's
beliefs), with the per-block probes, beside the baseline run's BPC on the same windows.

    python benches/bench_lm_decode.py RUN_BLOCKS RUN_E2E --steps 4 8 16 --windows 600 \\
        --json benches/results/arlm_decode.json --md benches/results/arlm_decode.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dbcore.evaluate import evaluate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "shakespeare"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("blocks", type=Path)
    ap.add_argument("e2e", type=Path)
    ap.add_argument("--valid-text", default=str(SHARED / "valid.txt"))
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--windows", type=int, default=None, help="held-out windows (default: all)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    data = f"text:{args.valid_text}"
    base = evaluate(args.e2e, data, num_samples=args.windows)
    rows = []
    for steps in args.steps:  # one chain per step count; both readouts come from its last probe
        r = evaluate(args.blocks, data, steps, "last", num_samples=args.windows)
        for decode in ("last", "product"):
            bpc = r["per_block"][-1][f"bpc_{decode}"]
            rows.append({"steps": steps, "decode": decode, "bpc": bpc, "ratio": bpc / base["bpc"],
                         "per_block": r["per_block"], "seconds": r["seconds"]})
            print(json.dumps(rows[-1]))
    result = {"blocks": str(args.blocks), "e2e": str(args.e2e), "data": data, "baseline": base, "chain": rows}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        lines = [f"# Decoding levers: {args.blocks.name} vs {args.e2e.name}", "",
                 f"Command: `python benches/bench_lm_decode.py RUN_BLOCKS RUN_E2E --steps "
                 f"{' '.join(map(str, args.steps))} --windows {args.windows}`; "
                 f"{base['num_tokens']} tokens.", "",
                 f"Baseline BPC {base['bpc']:.4f} (+- {base['bpc_stderr']:.4f}).", "",
                 "| Euler steps | readout | BPC | / baseline | per-block probes (BPC of the last logits) |",
                 "|---|---|---|---|---|"]
        for r in rows:
            probes = " / ".join(f"{p['bpc_last']:.3f}" for p in r["per_block"])
            lines.append(f"| {r['steps']} | {r['decode']} | {r['bpc']:.4f} | {r['ratio']:.3f} | {probes} |")
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
