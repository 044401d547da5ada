"""Memory and step time of one block against the end-to-end model (issue targets, METHOD.md 5).

Memory: `dbcore.memory.measure_all` (a fresh process per configuration, peak above baseline),
with the tight allocator (live tensor bytes, the figure held to the target) and with glibc's
default (what a process gets as is, free heap space included).
Step time: the end-to-end model and every block built in this one process, their training steps
interleaved round-robin so machine noise hits all of them alike; medians are compared.

    python benches/bench_blocks.py --config configs/vit_mnist.toml
Writes benches/results/blocks_<config stem>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dbcore import __version__
from dbcore import config as config_mod
from dbcore.memory import _noised, measure_all, training_loss
from dbcore.recipes import for_config

ROOT = Path(__file__).resolve().parents[1]


def interleaved_step_times(cfg, batch_size: int, rounds: int) -> dict:
    """Median training step of the baseline and of every block, through the recipe's own losses."""
    m = cfg.model
    recipe = for_config(cfg)
    torch.manual_seed(0)
    frozen = recipe.example_frozen()
    batch = recipe.example_batch(batch_size, frozen, torch.device("cpu"))
    steps = {}
    parts = [("e2e", recipe.build_e2e(frozen), None)]
    parts += [(f"block{b}", recipe.build_block(b, frozen), b) for b in range(m.num_blocks)]
    for name, model, block in parts:
        opt = torch.optim.AdamW(model.parameters())
        noised = _noised(recipe, batch, frozen, block) if block is not None or recipe.e2e_noise else None

        def step(model=model, opt=opt, block=block, noised=noised) -> None:
            opt.zero_grad()
            training_loss(recipe, model, batch, frozen, block, noised).backward()
            opt.step()

        steps[name] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds + 2):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    worst = max(med[f"block{b}"] for b in range(m.num_blocks))
    return {"median_step_seconds": med, "rounds": rounds,
            "max_block_step_over_e2e_per_block": worst / (med["e2e"] / m.num_blocks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/vit_mnist.toml"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--memory-target", type=float, default=None,
                    help="target of max block peak / (e2e / B) (default: 1.15 for dit, 1.3 otherwise)")
    ap.add_argument("--out", default=str(ROOT / "benches/results"))
    args = ap.parse_args()
    cfg = config_mod.load(args.config)
    bs = cfg.train.batch_size
    memory = measure_all(args.config, allocator="tight")
    memory_default = measure_all(args.config, allocator="default")
    steps = interleaved_step_times(cfg, bs, args.rounds)
    target = args.memory_target or (1.15 if cfg.recipe == "dit" else 1.3)
    result = {
        "meta": {"dbcore": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
                 "machine": platform.machine(), "threads": torch.get_num_threads(),
                 "command": " ".join(sys.argv)},
        "memory": memory,
        "memory_default_allocator": memory_default,
        "step_time": steps,
        "targets": {
            "max_block_peak_over_e2e_per_block": {"measured": memory["max_block_over_e2e_per_block"],
                                                  "target": target},
            "max_block_peak_over_e2e_per_block_default_allocator": {
                "measured": memory_default["max_block_over_e2e_per_block"], "target": None},
            "max_block_step_over_e2e_per_block": {"measured": steps["max_block_step_over_e2e_per_block"],
                                                  "target": 1.3},
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"blocks_{Path(args.config).stem}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
