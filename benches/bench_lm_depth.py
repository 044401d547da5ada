"""The end-to-end baseline's quality against its depth, beside DiffusionBlocks runs' figures.

Diagnoses an LM recipe's gap to its baseline: trains the `--e2e` baseline of CONFIG at each of
`--depths` (every other setting as CONFIG, the same steps), evaluates its held-out bits per byte by
`dbcore eval --json` and judges `--num-texts` samples with the Kneser-Ney character judge. The
DiffusionBlocks rows come from earlier results files (`--blocks LABEL=BPC_JSON,JUDGE_JSON`:
bench_lm.py's and bench_lm_judge.py's JSON of the same config family), so the table shows which
baseline depth a DiffusionBlocks chain matches.

    python benches/bench_lm_depth.py configs/arlm_shakespeare.toml --workdir /tmp/depth \\
        --depths 2 4 8 --eval-windows 1000 --num-texts 1024 \\
        --blocks "2/2/2/2=benches/results/arlm_shakespeare.json,benches/results/arlm_judge_shipped.json" \\
        --json benches/results/arlm_depth.json --md benches/results/arlm_depth.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_lm import SHARED, dbcore  # this script's folder is on sys.path


def config_at_depth(config: Path, depth: int, out: Path) -> Path:
    """CONFIG with `depth` layers; num_blocks = 1 and no layer_split (the baseline ignores both)."""
    text = config.read_text()
    for key, value in (("depth", str(depth)), ("num_blocks", "1")):
        text, n = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
        if n != 1:
            raise SystemExit(f"{config}: expected one `{key} =` line, found {n}")
    text = re.sub(r"(?m)^layer_split\s*=.*$", "", text)
    out.write_text(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--depths", type=int, nargs="+", required=True)
    ap.add_argument("--train-text", default=str(SHARED / "train.txt"))
    ap.add_argument("--valid-text", default=str(SHARED / "valid.txt"))
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: all)")
    ap.add_argument("--num-texts", type=int, default=1024)
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", action="append", default=[], metavar="LABEL=BPC_JSON,JUDGE_JSON")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    from dbcore import config as config_mod
    from dbcore.metrics.judge import KneserNey, judge_samples, ratio_interval
    from dbcore.runs.evaluate import sample_text_run

    cfg = config_mod.load(args.config)
    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.workdir / "store"
    if not (store / "zarr.json").is_file():
        dbcore("cache", str(args.config), "--data", f"text:{args.train_text}", "--out", str(store))
    configs = {d: config_at_depth(args.config, d, args.workdir / f"depth{d}.toml") for d in args.depths}
    runs = {d: args.workdir / f"e2e_depth{d}" for d in args.depths}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "dbcore.cli", "train", str(configs[d]), "--store",
                               str(store), "--out", str(runs[d]), "--e2e", "--quiet"]) for d in args.depths]
    if any(p.wait() for p in procs):
        raise SystemExit("training a baseline failed")
    judge = KneserNey.fit(Path(args.train_text).read_text(encoding="utf-8"))
    result: dict = {"command": " ".join(["python benches/bench_lm_depth.py", *sys.argv[1:]]),
                    "config": str(args.config), "steps": cfg.train.steps,
                    "train_seconds_wall": round(time.perf_counter() - t0, 1), "e2e": {}, "blocks": {}}
    scores = {}
    for d, run in runs.items():
        ev = ["eval", str(run), "--data", f"text:{args.valid_text}", "--json"]
        if args.eval_windows:
            ev += ["--num-samples", str(args.eval_windows)]
        report = json.loads(dbcore(*ev, capture=True))
        texts = sample_text_run(run, {"num": args.num_texts, "length": cfg.model.seq_len,
                                      "prompt": args.prompt, "seed": args.seed})
        verdict = judge_samples(judge, texts, args.prompt)
        scores[d] = verdict.pop("scores")
        result["e2e"][str(d)] = {"depth": d, "bpb": report["bpb"], "bits_per_token": report["bits_per_token"],
                                 "bits_per_token_stderr": report["bits_per_token_stderr"],
                                 "num_tokens": report["num_tokens"], **verdict}
    full = str(cfg.model.depth)
    if full in result["e2e"]:
        for d in runs:
            interval = ratio_interval(scores[d], scores[cfg.model.depth])
            result["e2e"][str(d)]["judge_ratio_95_vs_full"] = list(interval)
    for spec in args.blocks:
        label, _, paths = spec.rpartition("=")
        bpc_json, judge_json = (json.loads(Path(p).read_text()) for p in paths.split(","))
        bpb = {k: bpc_json[k].get("bpb", bpc_json[k].get("bpc")) for k in ("blocks", "e2e")}  # older: bpc
        result["blocks"][label] = {"bpb": bpb["blocks"], "judge_bpc": judge_json["blocks"]["judge_bpc"],
                                   "e2e_bpb_then": bpb["e2e"],
                                   "e2e_judge_bpc_then": judge_json["e2e"]["judge_bpc"], "from": paths}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        args.md.write_text(markdown(result))
    print(json.dumps({d: (r["bpb"], r["judge_bpc"]) for d, r in result["e2e"].items()}))


def markdown(r: dict) -> str:
    lines = [f"# {Path(r['config']).stem}: the baseline's depth beside DiffusionBlocks", "",
             f"Command: `{r['command']}`", "",
             f"{r['steps']} steps for every run (per block for DiffusionBlocks); held-out bits per byte "
             "by `dbcore eval`; judge BPC (Kneser-Ney 5-gram) of samples.", "",
             "| model | held-out bits per byte | stderr (bits per token) | judge BPC of samples "
             "| distinct 4-grams |",
             "|---|---|---|---|---|"]
    for d, e in r["e2e"].items():
        lines.append(f"| end-to-end, {d} layers | {e['bpb']:.4f} | {e['bits_per_token_stderr']:.4f} "
                     f"| {e['judge_bpc']:.3f} | {e['distinct_4']:.3f} |")
    for label, b in r["blocks"].items():
        lines.append(f"| DiffusionBlocks ({label}) | {b['bpb']:.4f} | | {b['judge_bpc']:.3f} | |")
    if r["blocks"]:
        lines += ["", "DiffusionBlocks rows: from " + "; ".join(
            f"{label}: {b['from']}" for label, b in r["blocks"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
