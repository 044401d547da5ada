"""Decoding levers of a trained AR language-model run, without retraining: held-out BPC of the
chain for several samplers (the Euler chain, the token-ancestral chain), step counts, readouts (the
last step's logits or the product of every step's beliefs) and numbers of noises averaged per
position (`--chains`: Euler's initial noises, whose estimate of generation's distribution tightens
as it grows; the ancestral chain's `eval_draws` per level and candidate), with per-block probes, beside
the baseline run's BPC on the same windows.

    python benches/bench_lm_decode.py RUN_BLOCKS RUN_E2E --steps 4 --chains 1 8 32 128 512 \\
        --windows 100 --json benches/results/arlm_chains.json --md benches/results/arlm_chains.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dbcore.runs.evaluate import evaluate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "shakespeare"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("blocks", type=Path)
    ap.add_argument("e2e", type=Path)
    ap.add_argument("--valid-text", default=str(SHARED / "valid.txt"))
    ap.add_argument("--samplers", nargs="+", default=["euler"], choices=["euler", "ancestral"])
    ap.add_argument("--steps", type=int, nargs="+", default=[4])
    ap.add_argument("--chains", type=int, nargs="+", default=[8], help="Euler: initial noises per position")
    ap.add_argument("--draws", type=int, nargs="+", default=[1],
                    help="ancestral: noise draws per level and candidate")
    ap.add_argument("--decodes", nargs="+", default=["last"], choices=["last", "product"])
    ap.add_argument("--windows", type=int, default=None, help="held-out windows (default: all)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    data = f"text:{args.valid_text}"
    base = evaluate(args.e2e, data, num_samples=args.windows)
    rows = []
    for sampler in args.samplers:
        for steps in args.steps:
            for decode in args.decodes if sampler == "euler" else [None]:
                for chains in args.chains if sampler == "euler" else args.draws:
                    r = evaluate(args.blocks, data, steps, decode, num_samples=args.windows,
                                 eval_chains=chains, eval_draws=chains, sampler=sampler)
                    rows.append({"sampler": sampler, "steps": steps, "decode": decode, "chains": chains,
                                 "bpc": r["bpc"], "bpc_stderr": r["bpc_stderr"],
                                 "ratio": r["bpc"] / base["bpc"],
                                 "per_block": r["per_block"], "seconds": r["seconds"]})
                    print(json.dumps(rows[-1]), flush=True)
    result = {"blocks": str(args.blocks), "e2e": str(args.e2e), "data": data, "baseline": base, "chain": rows}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        lines = [f"# Decoding levers: {args.blocks.name} vs {args.e2e.name}", "",
                 f"Command: `python benches/bench_lm_decode.py RUN_BLOCKS RUN_E2E --samplers "
                 f"{' '.join(args.samplers)} --draws {' '.join(map(str, args.draws))} --steps "
                 f"{' '.join(map(str, args.steps))} --chains {' '.join(map(str, args.chains))} "
                 f"--decodes {' '.join(args.decodes)} --windows {args.windows}`; "
                 f"{base['num_tokens']} tokens.",
                 "", f"Baseline BPC {base['bpc']:.4f} (+- {base['bpc_stderr']:.4f}).", "",
                 "| sampler | steps | readout | chains (Euler) or draws (ancestral) | BPC | +- | / baseline "
                 "| per-block probes |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:  # Euler: the first chain's readout after each block; ancestral: exact p so far
            probes = " / ".join(f"{p.get('bpc_last', p.get('bpc')):.3f}" for p in r["per_block"])
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['decode'] or 'last'} | {r['chains']} | "
                         f"{r['bpc']:.4f} | {r['bpc_stderr']:.4f} | {r['ratio']:.3f} | {probes} |")
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
