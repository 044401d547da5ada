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
import torch.nn as nn

from dbcore import __version__
from dbcore import config as config_mod
from dbcore.loss import sample_weights, weighted_ce
from dbcore.memory import measure_all
from dbcore.noise import noised_targets
from dbcore.recipes.vit import ViTBlock, ViTClassifier, make_target_embedding

ROOT = Path(__file__).resolve().parents[1]


def interleaved_step_times(cfg, batch_size: int, rounds: int) -> dict:
    m = cfg.model
    torch.manual_seed(0)
    x = torch.rand(batch_size, m.channels, m.image_size, m.image_size)
    labels = torch.randint(0, m.num_classes, (batch_size,))
    emb = make_target_embedding(m.num_classes, m.dim, 0, m.target_scale)
    steps = {}
    e2e = ViTClassifier(m)
    e2e_opt = torch.optim.AdamW(e2e.parameters())

    def e2e_step() -> None:
        e2e_opt.zero_grad()
        nn.functional.cross_entropy(e2e(x), labels).backward()
        e2e_opt.step()

    steps["e2e"] = e2e_step
    for b in range(m.num_blocks):
        block = ViTBlock(m, b, emb)
        opt = torch.optim.AdamW(block.parameters())
        z, sigma = noised_targets(emb[labels], torch.arange(batch_size), 0, b, 0, m)

        def block_step(block=block, opt=opt, z=z, sigma=sigma) -> None:
            opt.zero_grad()
            _, logits = block(x, z, sigma)
            weighted_ce(logits, labels, sample_weights(sigma, "none")).backward()
            opt.step()

        steps[f"block{b}"] = block_step
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
    ap.add_argument("--out", default=str(ROOT / "benches/results"))
    args = ap.parse_args()
    cfg = config_mod.load(args.config)
    bs = cfg.train.batch_size
    memory = measure_all(args.config, allocator="tight")
    memory_default = measure_all(args.config, allocator="default")
    steps = interleaved_step_times(cfg, bs, args.rounds)
    result = {
        "meta": {"dbcore": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
                 "machine": platform.machine(), "threads": torch.get_num_threads(),
                 "command": " ".join(sys.argv)},
        "memory": memory,
        "memory_default_allocator": memory_default,
        "step_time": steps,
        "targets": {
            "max_block_peak_over_e2e_per_block": {"measured": memory["max_block_over_e2e_per_block"],
                                                  "target": 1.3},
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
