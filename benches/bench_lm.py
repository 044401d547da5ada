"""A language-model recipe (mdlm or arlm) beside its end-to-end baseline, one command.

Caches the training text, trains every block and the `--e2e` baseline with the same steps (two
processes side by side), evaluates both by `dbcore eval --json` on the held-out text (bits per
byte, and per character for a character model), samples
texts from both and scores them with an independent judge (a Kneser-Ney character 5-gram fit on the
training text, `dbcore.metrics.judge`): judge BPC, distinct-4-gram ratio, and decoding speed (characters/s).

    python benches/bench_lm.py configs/mdlm_shakespeare.toml --workdir /tmp/mdlm \\
        --json benches/results/mdlm_shakespeare.json --md benches/results/mdlm_shakespeare.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "shakespeare"


def dbcore(*args: str, capture: bool = False) -> str:
    """Run the CLI as a user does; its stdout when `capture`."""
    cmd = [sys.executable, "-m", "dbcore.cli", *args]
    out = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return out.stdout if capture else ""


def train_both(config: str, store: Path, runs: dict[str, Path], steps: int | None) -> dict[str, float]:
    """Blocks and baseline as two processes at once (each with the config's threads)."""
    extra = ["--steps", str(steps)] if steps else []
    procs, t0 = {}, time.perf_counter()
    for kind, run in runs.items():
        args = ["train", config, "--store", str(store), "--out", str(run), "--quiet", *extra]
        if kind == "e2e":
            args.append("--e2e")
        procs[kind] = (subprocess.Popen([sys.executable, "-m", "dbcore.cli", *args]), time.perf_counter())
    seconds = {}
    for kind, (p, _) in procs.items():
        if p.wait():
            raise SystemExit(f"training {kind} failed ({p.returncode})")
        seconds[kind] = round(time.perf_counter() - t0, 1)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--train-text", default=str(SHARED / "train.txt"))
    ap.add_argument("--valid-text", default=str(SHARED / "valid.txt"))
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="override [train] steps")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: all)")
    ap.add_argument("--num-texts", type=int, default=8)
    ap.add_argument("--length", type=int, default=None, help="tokens per sample (default: seq_len)")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    from dbcore import config as config_mod
    from dbcore.metrics.judge import KneserNey, judge_samples
    from dbcore.runs.evaluate import sample_text_run

    cfg = config_mod.load(args.config)
    args.length = args.length or cfg.model.seq_len
    store = args.workdir / "store"
    if not (store / "zarr.json").is_file():
        dbcore("cache", args.config, "--data", f"text:{args.train_text}", "--out", str(store))
    runs = {"blocks": args.workdir / "run_blocks", "e2e": args.workdir / "run_e2e"}
    train_seconds = train_both(args.config, store, runs, args.steps)
    judge = KneserNey.fit(Path(args.train_text).read_text(encoding="utf-8"))
    import torch

    torch.set_num_threads(cfg.train.threads or 1)  # sampling speed: single-shot; bench_lm_speed.py compares
    result: dict = {"config": args.config, "recipe": cfg.recipe, "steps": args.steps or cfg.train.steps,
                    "model": cfg.to_dict()["model"], "train_seconds_wall": train_seconds,
                    "valid": args.valid_text}
    for kind, run in runs.items():
        ev = ["eval", str(run), "--data", f"text:{args.valid_text}", "--json"]
        if args.eval_windows:
            ev += ["--num-samples", str(args.eval_windows)]
        report = json.loads(dbcore(*ev, capture=True))
        t0 = time.perf_counter()
        texts = sample_text_run(run, {"num": args.num_texts, "length": args.length, "prompt": args.prompt})
        seconds = time.perf_counter() - t0
        out = args.workdir / f"samples_{kind}.json"
        out.write_text(json.dumps(texts, indent=1) + "\n")
        new_chars = sum(len(t) - len(args.prompt) for t in texts)
        result[kind] = {**report, **judge_samples(judge, texts, args.prompt),
                        "sample_seconds": round(seconds, 2),
                        "chars_per_second": round(new_chars / seconds, 1), "sample_path": str(out)}
    result["bpb_ratio"] = result["blocks"]["bpb"] / result["e2e"]["bpb"]
    result["bpb_minus_e2e"] = result["blocks"]["bpb"] - result["e2e"]["bpb"]
    if "bpc" in result["blocks"]:
        result["bpc_ratio"] = result["blocks"]["bpc"] / result["e2e"]["bpc"]
    result["judge_bpc_ratio"] = result["blocks"]["judge_bpc"] / result["e2e"]["judge_bpc"]
    result["valid_judge_bpc"] = judge.bits_per_char(Path(args.valid_text).read_text(encoding="utf-8")[:20000])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        args.md.write_text(markdown(result, args))
    print(json.dumps({k: result[k] for k in ("bpb_ratio", "bpb_minus_e2e", "judge_bpc_ratio")}))


def markdown(r: dict, args: argparse.Namespace) -> str:
    b, e = r["blocks"], r["e2e"]
    rows = [("held-out bits per byte (lower is better)", "bpb", 4),
            ("held-out bits per token", "bits_per_token", 4),
            ("  standard error", "bits_per_token_stderr", 4),
            ("judge BPC of samples (KN 5-gram)", "judge_bpc", 3), ("distinct 4-grams", "distinct_4", 3),
            ("sampling: characters per second (one shot; see bench_lm_speed.py)", "chars_per_second", 1)]
    lines = [f"# {r['recipe']} on Shakespeare: DiffusionBlocks vs end-to-end", "",
             f"Command: `python benches/bench_lm.py {args.config} --workdir ... --json {args.json}"
             + (f" --steps {args.steps}" if args.steps else "")
             + (f" --eval-windows {args.eval_windows}" if args.eval_windows else "")
             + (f" --num-texts {args.num_texts}" if args.num_texts != 8 else "") + "`", "",
             f"{r['steps']} steps per block and for the baseline; {b['num_tokens']} held-out tokens of "
             f"`{Path(r['valid']).name}` (tokenizer `{b['tokenizer']}`); {args.num_texts} samples of "
             f"{args.length} tokens each.", "",
             "| | DiffusionBlocks | end-to-end |", "|---|---|---|"]
    for label, key, digits in rows:
        lines.append(f"| {label} | {b[key]:.{digits}f} | {e[key]:.{digits}f} |")
    lines += ["", f"Bits per byte: blocks / e2e {r['bpb_ratio']:.3f}, "
              f"blocks - e2e {r['bpb_minus_e2e']:+.4f}; judge BPC of the held-out text itself: "
              f"{r['valid_judge_bpc']:.3f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
