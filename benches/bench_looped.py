"""The looped LM: DiffusionBlocks (the core as one denoiser, one pass per step) against Huginn's
truncated-BPTT baseline, at equal training compute.

Caches the training text once, trains one run per step budget for each model (two processes at
a time, each with the config's threads; every run a full schedule), reads each run's FLOPs from
its compute ledger, evaluates held-out BPC (`dbcore eval --json`) at the config's K for every
run, and at K = 1, 2, 4, ... for the largest run of each model (test-time depth). The curve of BPC
against training FLOPs and the K sweep go to JSON, Markdown and a PNG.

    python benches/bench_looped.py configs/looped_shakespeare.toml --workdir /tmp/looped \\
        --db-steps 300 1000 3000 --bptt-steps 100 300 1000 --windows 300 \\
        --json benches/results/looped_shakespeare.json --md benches/results/looped_shakespeare.md \\
        --png benches/results/looped_shakespeare.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "shakespeare"
LABELS = {"db": "DiffusionBlocks (one core pass)", "bptt": "truncated BPTT (Huginn)"}


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dbcore.cli", *args], check=True, text=True,
                         stdout=subprocess.PIPE)
    return out.stdout


def train_all(config: str, store: Path, jobs: list[tuple[str, int, Path]], parallel: int) -> None:
    """Every (model, steps, run) job, `parallel` processes at a time; finished runs are skipped
    by the trainer itself (their checkpoints say done)."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            kind, steps, run = pending.pop(0)
            args = ["train", config, "--store", str(store), "--out", str(run), "--steps", str(steps), "--quiet"]
            if kind == "bptt":
                args.append("--e2e")
            running.append((kind, steps, subprocess.Popen([sys.executable, "-m", "dbcore.cli", *args])))
        time.sleep(2)
        for job in list(running):
            if job[2].poll() is not None:
                if job[2].returncode:
                    raise SystemExit(f"training {job[0]} for {job[1]} steps failed ({job[2].returncode})")
                running.remove(job)


def ledger(run: Path) -> dict:
    """The compute of a finished run: the last metrics line's ledger."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["compute"]


def evaluate(run: Path, data: str, windows: int, k: int | None = None) -> dict:
    args = ["eval", str(run), "--data", data, "--json", "--num-samples", str(windows)]
    return json.loads(cli(*args, *(["--steps", str(k)] if k else [])))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, rows in result["budgets"].items():
        a.plot([r["flops"] for r in rows], [r["bpc"] for r in rows], "o-", label=LABELS[kind])
        sweep = result["depth_sweep"][kind]
        b.plot([r["iterations"] for r in sweep], [r["bpc"] for r in sweep], "o-", label=LABELS[kind])
    a.set_xscale("log")
    a.set_xlabel("training FLOPs")
    a.set_ylabel(f"held-out BPC (K = {result['iterations']})")
    b.set_xscale("log", base=2)
    b.set_xlabel("iterations K at inference")
    b.set_ylabel("held-out BPC (largest budget)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict, command: str) -> str:
    lines = ["# Looped LM on Shakespeare: DiffusionBlocks vs truncated BPTT", "", f"Command: `{command}`", "",
             f"Held-out BPC on {result['windows']} windows of valid.txt, {result['eval_chains']} initial "
             f"states averaged per position.", "", "## BPC against training compute (K = "
             f"{result['iterations']} at inference)", "",
             "| model | steps | training FLOPs | core passes fwd / bwd | BPC | +- | train seconds |",
             "|---|---|---|---|---|---|---|"]
    for kind, rows in result["budgets"].items():
        for r in rows:
            core = r["passes"]["core"]
            lines.append(f"| {LABELS[kind]} | {r['steps']} | {r['flops']:.3g} | {core[0]} / {core[1]} | "
                         f"{r['bpc']:.4f} | {r['bpc_stderr']:.4f} | {r['seconds']} |")
    lines += ["", "## BPC against iterations at inference (largest budget of each)", "",
              "| K | " + " | ".join(LABELS[k] for k in result["depth_sweep"]) + " |",
              "|---|" + "---|" * len(result["depth_sweep"])]
    ks = [r["iterations"] for r in next(iter(result["depth_sweep"].values()))]
    for i, k in enumerate(ks):
        cells = [f"{result['depth_sweep'][kind][i]['bpc']:.4f}" for kind in result["depth_sweep"]]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--train-text", default=str(SHARED / "train.txt"))
    ap.add_argument("--valid-text", default=str(SHARED / "valid.txt"))
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--db-steps", type=int, nargs="+", default=[300, 1000, 3000])
    ap.add_argument("--bptt-steps", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--windows", type=int, default=300, help="held-out windows")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    from dbcore import config as config_mod

    cfg = config_mod.load(args.config)
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    store = w / "store"
    if not store.exists():
        cli("cache", args.config, "--data", f"text:{args.train_text}", "--out", str(store))
    budgets = {"db": sorted(args.db_steps), "bptt": sorted(args.bptt_steps)}
    jobs = [(kind, s, w / f"{kind}_{s}") for kind in budgets for s in budgets[kind]]
    jobs.sort(key=lambda j: -j[1] * (2.5 if j[0] == "bptt" else 1))  # longest first
    t0 = time.perf_counter()
    train_all(args.config, store, jobs, args.parallel)
    data = f"text:{args.valid_text}"
    result = {"config": args.config, "windows": args.windows, "iterations": cfg.model.iterations,
              "eval_chains": cfg.model.eval_chains, "train_wall_s": round(time.perf_counter() - t0, 1),
              "budgets": {}, "depth_sweep": {}}
    for kind, steps in budgets.items():
        rows = []
        for s in steps:
            run = w / f"{kind}_{s}"
            r, comp = evaluate(run, data, args.windows), ledger(run)
            seconds = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]
            rows.append({"steps": s, "flops": comp["flops"], "passes": comp["passes"], "bpc": r["bpc"],
                         "bpc_stderr": r["bpc_stderr"], "seconds": seconds})
            print(json.dumps({"model": kind, **rows[-1]}), flush=True)
        result["budgets"][kind] = rows
        largest = w / f"{kind}_{steps[-1]}"
        result["depth_sweep"][kind] = [
            {"iterations": k, **{x: evaluate(largest, data, args.windows, k)[x] for x in ("bpc", "bpc_stderr")}}
            for k in args.ks]
        print(json.dumps({"model": kind, "depth_sweep": result["depth_sweep"][kind]}), flush=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    command = " ".join(["python benches/bench_looped.py", *sys.argv[1:]])
    if args.md:
        args.md.write_text(markdown(result, command))
    if args.png:
        plot(result, args.png)


if __name__ == "__main__":
    main()
