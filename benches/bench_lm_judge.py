"""The judge's verdict on two finished LM runs' samples, with its sampling error.

Draws `--num-texts` samples from each run (`dbcore sample`'s defaults: the config's sampler,
temperature 1, a newline prompt), scores every sample with the Kneser-Ney character judge fit on the
training text, and reports the mean judge BPC, distinct 4-grams, and a bootstrap 95% interval of the
ratio blocks / end-to-end (samples resampled within each run). 64 samples leave that interval about
0.14 wide, so a 1.05 target needs many more:

    python benches/bench_lm_judge.py WORKDIR/run_blocks WORKDIR/run_e2e --num-texts 1024 \\
        --json benches/results/arlm_judge.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "shakespeare"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("blocks", type=Path)
    ap.add_argument("e2e", type=Path)
    ap.add_argument("--train-text", default=str(SHARED / "train.txt"))
    ap.add_argument("--num-texts", type=int, default=1024)
    ap.add_argument("--length", type=int, default=None, help="characters per sample (default: seq_len)")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    from dbcore.metrics.judge import KneserNey, judge_samples, ratio_interval
    from dbcore.runs.evaluate import load_run, sample_text_run

    judge = KneserNey.fit(Path(args.train_text).read_text(encoding="utf-8"))
    result: dict = {"command": " ".join(["python benches/bench_lm_judge.py", *sys.argv[1:]]),
                    "num_texts": args.num_texts, "prompt": args.prompt, "seed": args.seed}
    scores = {}
    for kind, run in (("blocks", args.blocks), ("e2e", args.e2e)):
        length = args.length or load_run(run)[1].model.seq_len
        t0 = time.perf_counter()
        texts = sample_text_run(run, {"num": args.num_texts, "length": length, "prompt": args.prompt,
                                      "seed": args.seed})
        verdict = judge_samples(judge, texts, args.prompt)
        scores[kind] = verdict.pop("scores")
        result[kind] = {"run": str(run), "length": length, **verdict,
                        "sample_seconds": round(time.perf_counter() - t0, 2)}
    result["judge_bpc_ratio"] = result["blocks"]["judge_bpc"] / result["e2e"]["judge_bpc"]
    result["ratio_95"] = list(ratio_interval(scores["blocks"], scores["e2e"], seed=args.seed))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("judge_bpc_ratio", "ratio_95")}))


if __name__ == "__main__":
    main()
