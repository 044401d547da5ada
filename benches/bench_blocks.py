"""Memory and step time of one block against the end-to-end model (issue targets, METHOD.md 5).

Memory: `dbcore.runs.memory.measure_all` (a fresh process per configuration, peak above baseline),
with the tight allocator (live tensor bytes, the figure held to the target) and with glibc's
default (what a process gets as is, free heap space included).
Step time: the end-to-end model and every block built in this one process, their training steps
interleaved round-robin so machine noise hits all of them alike; medians are compared.

    python benches/bench_blocks.py --config configs/vit_mnist.toml
    python benches/bench_blocks.py --config configs/vit_b16.toml --device cuda --peak-tflops 989
Writes benches/results/blocks_<config stem>[_cuda].json.
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
from dbcore.method.flops import BACKWARD_FACTOR, layer_flops, linear_flops, score_flops
from dbcore.recipes import for_config
from dbcore.runs.loop import make_optimizer, prepare_device
from dbcore.runs.memory import _noised, measure_all, training_loss
from dbcore.runs.step import autocast_for, precision_of

ROOT = Path(__file__).resolve().parents[1]


def interleaved_step_times(cfg, batch_size: int, rounds: int, device: torch.device) -> dict:
    """Median training step of the baseline and of every block, through the recipe's own losses and
    the trainer's settings (`[train] precision`: bf16 autocast on CUDA by default, TF32, the fused
    AdamW on CUDA); on CUDA every step is timed to its synchronisation."""
    m = cfg.model
    recipe = for_config(cfg)
    torch.manual_seed(0)
    frozen = recipe.example_frozen()
    batch = recipe.example_batch(batch_size, frozen, device)
    frozen = {k: v.to(device) for k, v in frozen.items()}
    steps = {}
    parts = [("e2e", recipe.build_e2e(frozen), None)]
    parts += [(f"block{b}", recipe.build_block(b, frozen), b) for b in range(m.num_blocks)]
    for name, model, block in parts:
        model.to(device)
        prepare_device(model, cfg)
        opt = make_optimizer(model, cfg)
        noised = _noised(recipe, batch, frozen, block) if block is not None or recipe.e2e_noise else None

        def step(model=model, opt=opt, block=block, noised=noised) -> None:
            opt.zero_grad()
            with autocast_for(cfg.train.precision, device):
                loss = training_loss(recipe, model, batch, frozen, block, noised)
            loss.backward()
            opt.step()

        steps[name] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds + 2):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    worst = max(med[f"block{b}"] for b in range(m.num_blocks))
    return {"median_step_seconds": med, "rounds": rounds, "batch_size": batch_size,
            "precision": precision_of(cfg.train.precision, device),
            "max_block_step_over_e2e_per_block": worst / (med["e2e"] / m.num_blocks)}


def vit_e2e_step_flops(m, batch_size: int) -> float:
    """FLOPs of one training step of the ViT baseline (`dbcore.method.flops` conventions): patch
    embedding, L - 1 full layers, the last layer's keys and values of every row and the rest for
    the CLS row alone (`forward_rows`), the head; backward BACKWARD_FACTOR times the forward."""
    t = m.num_patches + 1
    rows, d, hidden = batch_size * t, m.dim, int(m.dim * m.mlp_ratio)
    patch = linear_flops(batch_size * m.num_patches, m.channels * m.patch_size**2, d)
    last = (linear_flops(rows, d, 2 * d) + linear_flops(batch_size, d, 2 * d)
            + 2 * linear_flops(batch_size, d, hidden) + score_flops(batch_size, t, d))
    forward = patch + (m.depth - 1) * layer_flops(rows, d, m.mlp_ratio, t) + last
    forward += linear_flops(batch_size, d, m.num_classes)
    return (1 + BACKWARD_FACTOR) * forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/vit_mnist.toml"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="override [train] batch_size")
    ap.add_argument("--no-memory", action="store_true", help="step times only")
    ap.add_argument("--checkpoint-chunks", type=int, default=None,
                    help="override [train] checkpoint_chunks of the checkpointed memory runs")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak for the step's precision: model FLOPs utilisation of the "
                         "baseline's step (ViT)")
    ap.add_argument("--memory-target", type=float, default=None,
                    help="target of max block peak / (e2e / B) (default: 1.15 for dit, 1.3 otherwise)")
    ap.add_argument("--out", default=str(ROOT / "benches/results"))
    args = ap.parse_args()
    cfg = config_mod.load(args.config)
    bs = args.batch_size or cfg.train.batch_size
    device = torch.device(args.device)
    meta = {"dbcore": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "command": " ".join(sys.argv)}
    result: dict = {"meta": meta}
    targets: dict = {}
    if not args.no_memory:
        target = args.memory_target or (1.15 if cfg.recipe == "dit" else 1.3)
        result["memory"] = measure_all(args.config, bs, args.device, allocator="tight",
                                       checkpoint_chunks=args.checkpoint_chunks)
        targets["max_block_peak_over_e2e_per_block"] = {
            "measured": result["memory"]["max_block_over_e2e_per_block"], "target": target}
        if device.type == "cpu":
            result["memory_default_allocator"] = measure_all(args.config, bs, allocator="default",
                                                             checkpoint_chunks=args.checkpoint_chunks)
            default = result["memory_default_allocator"]["max_block_over_e2e_per_block"]
            targets["max_block_peak_over_e2e_per_block_default_allocator"] = {"measured": default,
                                                                               "target": None}
    steps = interleaved_step_times(cfg, bs, args.rounds, device)
    if cfg.recipe == "vit":
        flops = vit_e2e_step_flops(cfg.model, bs)
        steps["e2e_step_flops"] = flops
        steps["e2e_achieved_tflops"] = flops / steps["median_step_seconds"]["e2e"] / 1e12
        if args.peak_tflops:
            steps["peak_tflops"] = args.peak_tflops
            steps["e2e_model_flops_utilisation"] = steps["e2e_achieved_tflops"] / args.peak_tflops
    result["step_time"] = steps
    targets["max_block_step_over_e2e_per_block"] = {"measured": steps["max_block_step_over_e2e_per_block"],
                                                    "target": 1.3}
    result["targets"] = targets
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    path = out / f"blocks_{Path(args.config).stem}{suffix}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
