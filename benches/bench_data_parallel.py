"""One block trained data-parallel under torchrun (gloo, CPU) beside one process at the same global batch.

Three runs of block 0 of `--config` (default configs/vit_digits.toml) for `--steps` steps, each a
fresh command with one thread per process: one process; `--ranks` processes under torchrun; the
same under torchrun killed after its first checkpoint (every rank's AdamW step `--crash-at` raises,
tests/helpers/crash_at_step.py), then resumed by one process. Reported: every weight's largest
difference from the one-process run relative to its tensor's largest value (the worst tensors
named), the CPU time (user + system of the command and all its processes, start-up included) of
each, and the training loop's own seconds (`elapsed_s` of its last metrics line; times the ranks,
since each process runs one thread, for the loop's process-seconds).

    python benches/bench_data_parallel.py --json benches/results/data_parallel_vit_digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dbcore.runs import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
CRASH = ROOT / "tests" / "helpers" / "crash_at_step.py"


def command(args: list[str], ranks: int, program: list[str]) -> dict:
    """Run `python PROGRAM ARGS` (or torchrun with `ranks` processes); its wall and CPU seconds."""
    launch = [sys.executable] if ranks == 1 else [str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = subprocess.run([*launch, *program, *args], capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"returncode": out.returncode, "wall_seconds": round(time.perf_counter() - t0, 2),
            "cpu_seconds": round(cpu, 2), "stderr_tail": out.stderr[-400:] if out.returncode else ""}


def relative_differences(a: Path, b: Path, name: str = "block0") -> dict[str, float]:
    """Each tensor's largest difference relative to its largest value, the worst first."""
    x, _ = checkpoint.load(a / name, prefix="model.")
    y, _ = checkpoint.load(b / name, prefix="model.")
    rel = {k: float((x[k].float() - y[k].float()).abs().max() / x[k].float().abs().max().clamp_min(1e-12))
           for k in x}
    return dict(sorted(rel.items(), key=lambda kv: -kv[1]))


def loop_seconds(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]


def checkpointing_every(toml: str, every: int) -> str:
    """A config's text with `[train] checkpoint_every = every`."""
    lines = [ln for ln in toml.splitlines() if not ln.startswith("checkpoint_every")]
    at = lines.index("[train]") + 1
    return "\n".join([*lines[:at], f"checkpoint_every = {every}", *lines[at:]]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "vit_digits.toml"))
    ap.add_argument("--data", default="digits:train")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--crash-at", type=int, default=120, help="the AdamW step at which the killed run dies")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dbcore-dp-") as tmp:
        work = Path(tmp)
        cfg = work / "config.toml"  # a copy that checkpoints often enough to be killed after one
        cfg.write_text(checkpointing_every(Path(args.config).read_text(), args.checkpoint_every))
        store = work / "c.zarr"
        subprocess.run([sys.executable, "-m", "dbcore", "cache", str(cfg), "--data", args.data, "--out",
                        str(store)], check=True, capture_output=True)
        train = ["train", str(cfg), "--store", str(store), "--block", "0", "--steps", str(args.steps),
                 "--quiet"]
        dbcore = ["-m", "dbcore"]
        one = command([*train, "--out", str(work / "one")], 1, dbcore)
        many = command([*train, "--out", str(work / "many")], args.ranks, dbcore)
        crash = [str(CRASH), str(args.crash_at)]
        killed = command([*train, "--out", str(work / "killed")], args.ranks, crash)
        saved = json.loads((work / "killed" / "block0.json").read_text())
        resumed = command([*train, "--out", str(work / "killed")], 1, dbcore)
        for name, r in (("one", one), ("many", many), ("resumed", resumed)):
            if r["returncode"]:
                raise SystemExit(f"run {name} failed:\n{r['stderr_tail']}")
        diffs = {"data_parallel_vs_one": relative_differences(work / "one", work / "many"),
                 "killed_and_resumed_vs_one": relative_differences(work / "one", work / "killed")}
        out = {
            "command": "python benches/bench_data_parallel.py " + " ".join(sys.argv[1:]),
            "config": args.config, "block": 0, "steps": args.steps, "ranks": args.ranks,
            "threads_per_process": 1, "backend": "gloo (CPU)",
            "one_process": one, "data_parallel": many,
            "killed": {**killed, "checkpoint_step": saved["step"], "crash_at_step": args.crash_at},
            "resumed_by_one_process": resumed,
            "max_relative_weight_difference": {name: max(diff.values()) for name, diff in diffs.items()},
            "worst_tensors": {name: dict(list(diff.items())[:3]) for name, diff in diffs.items()},
            "tensors_over_1e-3": {name: [k for k, v in diff.items() if v > 1e-3]
                                  for name, diff in diffs.items()},
            "cpu_ratio": round(many["cpu_seconds"] / one["cpu_seconds"], 3),
            "wall_ratio": round(many["wall_seconds"] / one["wall_seconds"], 3),
            "loop_seconds": {"one_process": loop_seconds(work / "one"),
                             "data_parallel": loop_seconds(work / "many")},
            "loop_process_seconds_ratio": round(
                args.ranks * loop_seconds(work / "many") / loop_seconds(work / "one"), 3),
        }
    print(json.dumps(out, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")  # complete, then in place (as bench_process_memory.py)
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(args.json)


if __name__ == "__main__":
    main()
