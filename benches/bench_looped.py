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
LABELS = {"db": "DiffusionBlocks (one core pass)", "bptt": "truncated BPTT (Huginn)",
          "db euler": "DiffusionBlocks, Euler chain"}
COLORS = {"db": "tab:blue", "bptt": "tab:orange", "db euler": "tab:green"}


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dbcore.cli", *args], check=True, text=True,
                         stdout=subprocess.PIPE)
    return out.stdout


def train_all(config: str, store: Path, jobs: list[tuple[str, int, Path]], parallel: int) -> None:
    """Every (model, steps, run) job, `parallel` processes at a time; finished runs (their
    checkpoints say done) are skipped."""
    pending, running = [j for j in jobs if not finished(j[2], j[0])], []
    while pending or running:
        while pending and len(running) < parallel:
            kind, steps, run = pending.pop(0)
            args = ["train", config, "--store", str(store), "--out", str(run), "--steps", str(steps),
                    "--quiet"]
            if kind == "bptt":
                args.append("--e2e")
            running.append((kind, steps, subprocess.Popen([sys.executable, "-m", "dbcore.cli", *args])))
        time.sleep(2)
        for job in list(running):
            if job[2].poll() is not None:
                if job[2].returncode:
                    raise SystemExit(f"training {job[0]} for {job[1]} steps failed ({job[2].returncode})")
                running.remove(job)


def finished(run: Path, kind: str) -> bool:
    meta = run / ("e2e.json" if kind == "bptt" else "block0.json")
    return meta.is_file() and bool(json.loads(meta.read_text()).get("done"))


def ledger(run: Path) -> dict:
    """The compute of a finished run: the last metrics line's ledger."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["compute"]


def evaluate(run: Path, data: str, windows: int, k: int | None = None, sampler: str | None = None) -> dict:
    """`dbcore eval --json` of a run, kept beside it (evals/ of the workdir): a rerun of the bench
    after an interruption skips the evaluations it has, of the same data and no older than the
    run's last training step."""
    kept = run.parent / "evals" / f"{run.name}_w{windows}_k{k or 'config'}_{sampler or 'config'}.json"
    if kept.is_file() and kept.stat().st_mtime >= (run / "metrics.jsonl").stat().st_mtime:
        report = json.loads(kept.read_text())
        if report.get("data") == data:
            return report
    args = ["eval", str(run), "--data", data, "--json", "--num-samples", str(windows)]
    args += ["--steps", str(k)] if k else []
    args += ["--sampler", sampler] if sampler else []
    report = json.loads(cli(*args))
    kept.parent.mkdir(exist_ok=True)
    kept.write_text(json.dumps(report) + "\n")
    return report


def memory(config: str, workdir: Path) -> dict:
    """Peak training memory of one step (`dbcore.runs.memory.measure_all`, fresh processes, tight
    allocator): the denoiser's single core pass against BPTT through k iterations. The baseline's
    example step draws r from its uniforms, so the config is measured with a mean of 8k
    iterations, making r >= k (checked): the peak of a step with full truncated back-propagation."""
    import tomllib
    import torch

    from dbcore import config as config_mod
    from dbcore.recipes import for_config
    from dbcore.runs.memory import _noised, measure_all

    text = Path(config).read_text()
    table = tomllib.loads(text)["model"]
    k = table.get("backprop_iterations", 4)
    probe = workdir / "memory.toml"
    probe.write_text(text.replace(f"train_iterations = {table['train_iterations']}",
                                  f"train_iterations = {8 * k}", 1))
    recipe = for_config(config_mod.load(probe))
    frozen = recipe.example_frozen()
    batch = recipe.example_batch(recipe.cfg.train.batch_size, frozen, torch.device("cpu"))
    r, k_used = recipe.baseline_iterations(_noised(recipe, batch, frozen, None))
    if k_used != k:
        raise SystemExit(f"memory probe drew r = {r} < k = {k}")
    m = measure_all(probe)
    return {"bptt_iterations": r, "bptt_backprop_iterations": k, "bptt_peak_bytes": m["e2e_peak_bytes"],
            "db_peak_bytes": m["block_peak_bytes"][0],
            "db_over_bptt": m["block_peak_bytes"][0] / m["e2e_peak_bytes"],
            "bptt_params": m["measured_parts"]["e2e"]["params"],
            "db_params": m["measured_parts"]["block0"]["params"], "allocator": m["allocator"]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, rows in result["budgets"].items():
        a.plot([r["flops"] for r in rows], [r["bpc"] for r in rows], "o-", label=LABELS[kind],
               color=COLORS[kind])
        if kind == "db" and all("bpc_k1" in r for r in rows):
            a.plot([r["flops"] for r in rows], [r["bpc_k1"] for r in rows], "o--",
                   label=f"{LABELS[kind]}, K = 1", color=COLORS[kind])
    for kind, sweep in result["depth_sweep"].items():
        b.plot([r["iterations"] for r in sweep], [r["bpc"] for r in sweep], "o-", label=LABELS[kind],
               color=COLORS[kind])
    a.set_xscale("log")
    a.set_xlabel("training FLOPs")
    a.set_ylabel(f"held-out BPC (K = {result['iterations']} unless marked)")
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
             f"Held-out BPC on {result['windows']} windows of valid.txt. DiffusionBlocks: the "
             f"{result.get('sampler', 'euler')} sampler"
             + (f" (exact over token draws, {result.get('eval_draws')} noise draw per level and "
                "candidate)" if result.get("sampler") == "ancestral" else "")
             + f"; BPTT (and the Euler chain): {result['eval_chains']} initial states averaged per "
             "position.", "", "## BPC against training compute (K = "
             f"{result['iterations']} at inference)", "",
             "| model | steps | training FLOPs | core passes fwd / bwd | BPC | +- | BPC at K = 1 "
             "| train seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, rows in result["budgets"].items():
        for r in rows:
            core = r["passes"]["core"]
            lines.append(f"| {LABELS[kind]} | {r['steps']} | {r['flops']:.3g} | {core[0]} / {core[1]} | "
                         f"{r['bpc']:.4f} | {r['bpc_stderr']:.4f} | {r.get('bpc_k1', float('nan')):.4f} | "
                         f"{r['seconds']} |")
    if set(result["budgets"]) >= {"db", "bptt"}:
        lines += ["", "At matched budgets (the i-th of each model; FLOPs ratio DiffusionBlocks / BPTT), "
                  "DiffusionBlocks' BPC over BPTT's, each at K = " f"{result['iterations']}"
                  " and DiffusionBlocks at K = 1:", "",
                  "| FLOPs ratio | K = config | DiffusionBlocks K = 1 |",
                  "|---|---|---|"]
        for a, b in zip(result["budgets"]["db"], result["budgets"]["bptt"], strict=False):
            lines.append(f"| {a['flops'] / b['flops']:.3f} | {a['bpc'] / b['bpc']:.3f} | "
                         f"{a.get('bpc_k1', float('nan')) / b['bpc']:.3f} |")
    lines += ["", "## BPC against iterations at inference (largest budget of each)", "",
              "| K | " + " | ".join(LABELS[k] for k in result["depth_sweep"]) + " |",
              "|---|" + "---|" * len(result["depth_sweep"])]
    ks = [r["iterations"] for r in next(iter(result["depth_sweep"].values()))]
    for i, k in enumerate(ks):
        cells = [f"{result['depth_sweep'][kind][i]['bpc']:.4f}" for kind in result["depth_sweep"]]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if "memory" in result:
        mem = result["memory"]
        lines += ["", "## Peak training memory of one step (batch of the config, CPU, live tensor bytes)", "",
                  "| | peak | parameters |", "|---|---|---|",
                  f"| DiffusionBlocks (one core pass) | {mem['db_peak_bytes'] / 2**20:.1f} MiB | "
                  f"{mem['db_params']} |",
                  f"| BPTT through the last {mem['bptt_backprop_iterations']} of {mem['bptt_iterations']} "
                  f"iterations | {mem['bptt_peak_bytes'] / 2**20:.1f} MiB | {mem['bptt_params']} |",
                  "", f"DiffusionBlocks / BPTT: {mem['db_over_bptt']:.3f}."]
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
    ap.add_argument("--euler", action="store_true",
                    help="also sweep K with the denoiser's Euler chain (its BPC: eval_chains initial states)")
    ap.add_argument("--plot-only", action="store_true", help="redraw --png from --json")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the memory measurement, merged into --json")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    from dbcore import config as config_mod

    cfg = config_mod.load(args.config)
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        plot(json.loads(args.json.read_text()), args.png)
        return
    if args.memory_only:
        result = json.loads(args.json.read_text()) if args.json.exists() else {}
        result["memory"] = memory(args.config, w)
        print(json.dumps(result["memory"]))
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        if args.md and "budgets" in result:
            args.md.write_text(markdown(result, result.get("command", "")))
        return
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
              "eval_chains": cfg.model.eval_chains, "sampler": cfg.model.sampler,
              "eval_draws": cfg.model.eval_draws, "train_wall_s": round(time.perf_counter() - t0, 1),
              "budgets": {}, "depth_sweep": {}}
    for kind, steps in budgets.items():
        rows = []
        for s in steps:
            run = w / f"{kind}_{s}"
            r, comp = evaluate(run, data, args.windows), ledger(run)
            seconds = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]
            rows.append({"steps": s, "flops": comp["flops"], "passes": comp["passes"], "bpc": r["bpc"],
                         "bpc_stderr": r["bpc_stderr"], "seconds": seconds,
                         "bpc_k1": evaluate(run, data, args.windows, 1)["bpc"]})
            print(json.dumps({"model": kind, **rows[-1]}), flush=True)
        result["budgets"][kind] = rows
        largest = w / f"{kind}_{steps[-1]}"
        sweep = []
        for k in args.ks:  # the largest run's K = config was evaluated above
            r = rows[-1] if k == cfg.model.iterations else evaluate(largest, data, args.windows, k)
            sweep.append({"iterations": k, "bpc": r["bpc"], "bpc_stderr": r["bpc_stderr"]})
        result["depth_sweep"][kind] = sweep
        print(json.dumps({"model": kind, "depth_sweep": result["depth_sweep"][kind]}), flush=True)
    if args.euler:
        largest = w / f"db_{budgets['db'][-1]}"
        sweep = []
        for k in args.ks:
            r = evaluate(largest, data, args.windows, k, "euler")
            sweep.append({"iterations": k, "bpc": r["bpc"], "bpc_stderr": r["bpc_stderr"]})
        result["depth_sweep"]["db euler"] = sweep
    command = " ".join(["python benches/bench_looped.py", *sys.argv[1:]])
    result["command"] = command
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        args.md.write_text(markdown(result, command))
    if args.png:
        plot(result, args.png)


if __name__ == "__main__":
    main()
