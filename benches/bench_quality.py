"""Quality ablation: valid accuracy of DiffusionBlocks for each lever, beside the end-to-end baseline.

Levers (METHOD.md section 9): the noise distribution inside a block, the loss weight, the target
embedding scale, B, training length, Euler steps per block at inference, the training mode.
Every variant changes one thing from the base config; all run in this one process, same data.

    python benches/bench_quality.py --config configs/vit_mnist.toml --data mnist --steps 600
Writes benches/results/quality_<data>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from dbcore import __version__
from dbcore import config as config_mod
from dbcore.data.cache import write_cache
from dbcore.data.sources import load_source
from dbcore.runs.evaluate import evaluate
from dbcore.runs.train import train_run

ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "mnist": (f"npz:{ROOT.parent / 'shared/datasets/mnist/train.npz'}",
              f"npz:{ROOT.parent / 'shared/datasets/mnist/valid.npz'}"),
    "digits": ("digits:train", "digits:valid"),
    "fashion_mnist": (f"npz:{ROOT.parent / 'shared/datasets/fashion_mnist/train.npz'}",
                      f"npz:{ROOT.parent / 'shared/datasets/fashion_mnist/valid.npz'}"),
    "cifar10": (f"tar:{ROOT.parent / 'shared/datasets/cifar10/train-{00000..00002}.tar'}",
                f"tar:{ROOT.parent / 'shared/datasets/cifar10/valid-00000.tar'}"),
}

# name -> (model overrides, train overrides, eval inference steps per block or None)
VARIANTS: dict[str, tuple[dict, dict, int | None]] = {
    "base": ({}, {}, None),
    "sigma loguniform": ({"sigma_dist": "loguniform"}, {}, None),
    "sigma loguniform-first": ({"sigma_dist": "loguniform-first"}, {}, None),
    "weight edm": ({}, {"weight": "edm"}, None),
    "weight normalized": ({}, {"weight": "normalized"}, None),
    "weight clamped": ({}, {"weight": "clamped"}, None),
    "target scale 0.5": ({"target_scale": 0.5}, {}, None),
    "target scale 2": ({"target_scale": 2.0}, {}, None),
    "2x steps": ({}, {"steps_factor": 2}, None),
    "sequential": ({}, {"mode": "sequential"}, None),
    "target mixing 0.5": ({}, {"mix_fraction": 0.5}, None),
    "target mixing 0.75": ({}, {"mix_fraction": 0.75}, None),
    "paper shared layout (comparison)": ({}, {"paper_shared": True}, None),
    "loguniform-first + mixing 0.5": ({"sigma_dist": "loguniform-first"}, {"mix_fraction": 0.5}, None),
    "loguniform-first + sequential": ({"sigma_dist": "loguniform-first"}, {"mode": "sequential"}, None),
    "gates start at 1": ({"gate_init": 1.0}, {}, None),
    "top-first + gates 1": ({"sigma_dist": "top-first", "gate_init": 1.0}, {}, None),
    "top + gates 1": ({"sigma_dist": "top", "gate_init": 1.0}, {}, None),
    "adaln-single r16": ({"conditioning": "adaln-single", "modulation_rank": 16}, {}, None),
    "adaln-single r64": ({"conditioning": "adaln-single", "modulation_rank": 64}, {}, None),
    "top-first + gates 1 + sequential": ({"sigma_dist": "top-first", "gate_init": 1.0},
                                         {"mode": "sequential"}, None),
}
EVAL_ONLY = {"base, 2 steps/block": ("base", 2), "base, 4 steps/block": ("base", 4)}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def run_variant(base: dict, name: str, work: Path, train_src: str, valid_src: str, steps: int,
                overrides: tuple[dict, dict] | None = None, label: str | None = None,
                e2e: bool = False) -> dict:
    """Cache, train and evaluate one variant: overrides (model, train) default to VARIANTS[name]."""
    model_o, train_o = overrides if overrides is not None else VARIANTS[name][:2]
    data = copy.deepcopy(base)
    data["model"].update(model_o)
    train_o = dict(train_o)
    data["train"]["steps"] = steps * train_o.pop("steps_factor", 1)
    paper_shared = train_o.pop("paper_shared", False)
    data["train"].update(train_o)
    cfg = config_mod.from_dict(data, f"variant {name}")
    slug = _slug(name)
    t0 = time.perf_counter()
    store = work / f"{slug}.zarr"
    write_cache(cfg, load_source(train_src), store, overwrite=True, progress=False)
    shutil.rmtree(work / slug, ignore_errors=True)
    train_run(cfg, store, work / slug, e2e=e2e, progress=False, paper_shared=paper_shared)
    result = evaluate(work / slug, valid_src)
    seconds = round(time.perf_counter() - t0, 1)
    result.update(variant=label or name, config=cfg.to_dict(), train_seconds=seconds)
    return result


def write_results(args: argparse.Namespace, rows: list[dict], steps: int) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"dbcore": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "machine": platform.machine(), "threads": torch.get_num_threads(), "data": args.data,
            "config": args.config, "steps_per_block": steps, "command": " ".join(sys.argv)}
    path = out / f"{args.name or 'quality_' + args.data}.json"
    if args.append and path.is_file():
        old = json.loads(path.read_text())
        names = {r["variant"] for r in rows}
        rows = [r for r in old["results"] if r["variant"] not in names] + rows
        if meta["command"] not in old["meta"]["command"]:
            meta["command"] = " && ".join([old["meta"]["command"], meta["command"]])
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [
        f"# Quality on {args.data} ({steps} steps per block; `{meta['command']}`)",
        "",
        "| variant | valid accuracy | valid loss | inference steps | decode | along the chain "
        "| train+eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = "accuracy_product" if r.get("decode") == "product" else "accuracy_last"
        chain = " / ".join(f"{100 * p[key]:.2f}" for p in r.get("per_block", [])) or "-"
        lines.append(f"| {r['variant']} | {r['accuracy']:.4f} | {r['loss']:.4f} | "
                     f"{r.get('inference_steps') or '-'} | {r.get('decode') or '-'} | {chain} | "
                     f"{r['train_seconds']} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/vit_mnist.toml"))
    ap.add_argument("--data", choices=sorted(DATA), default="mnist")
    ap.add_argument("--steps", type=int, default=None, help="per-block steps (default: the config's)")
    ap.add_argument("--variants", nargs="*", default=["all"], help="names, or all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription)")
    ap.add_argument("--seed", type=int, default=None, help="override [train] seed (init, data order, noise)")
    ap.add_argument("--name", default=None, help="results file stem (default: quality_<data>)")
    ap.add_argument("--append", action="store_true", help="merge into an existing results file")
    ap.add_argument("--work", default="/tmp/dbcore_quality")
    ap.add_argument("--out", default=str(ROOT / "benches/results"))
    args = ap.parse_args()
    base_cfg = config_mod.load(args.config)
    half_b = max(1, base_cfg.model.num_blocks // 2)
    VARIANTS[f"B={half_b}"] = ({"num_blocks": half_b}, {}, None)
    per_block = base_cfg.model.depth // base_cfg.model.num_blocks
    if base_cfg.model.num_blocks > 1 and per_block > 1:  # the first block sets the chain: deepen it
        split = [per_block + 1] + [per_block] * (base_cfg.model.num_blocks - 2) + [per_block - 1]
        VARIANTS["first block +1 layer"] = ({"layer_split": split}, {}, None)
    # end-to-end references: the full depth, and one block's depth alone (what the first block,
    # which sees no label in z, can reach by itself)
    one_block = {"depth": per_block, "num_blocks": 1, "layer_split": None}
    e2e_variants = {"e2e": ("end-to-end", {}),
                    "e2e one block deep": (f"end-to-end, {per_block} layers", one_block)}
    if args.variants == ["all"]:
        args.variants = [*VARIANTS, *e2e_variants]
    base = base_cfg.to_dict()
    base["train"]["threads"] = args.threads
    if args.seed is not None:
        base["train"]["seed"] = args.seed
    steps = args.steps or base_cfg.train.steps
    train_src, valid_src = DATA[args.data]
    work = Path(args.work) / args.data
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants:
        if name in e2e_variants:
            label, model_o = e2e_variants[name]
            r = run_variant(base, name, work, train_src, valid_src, steps, (model_o, {}), label, e2e=True)
        else:
            r = run_variant(base, name, work, train_src, valid_src, steps)
        rows.append(r)
        print(json.dumps({k: r[k] for k in ("variant", "accuracy", "loss", "train_seconds")}), flush=True)
        if name not in e2e_variants:  # the same checkpoints, the other decoding (no training)
            other = "product" if r["decode"] == "last" else "last"
            e = evaluate(work / _slug(name), valid_src, decode=other)
            e.update(variant=f"{name}, {other} decode", config=r["config"], train_seconds=0.0)
            rows.append(e)
            print(json.dumps({k: e[k] for k in ("variant", "accuracy", "loss")}), flush=True)
        if name == "base":
            for label, (_, per_block) in EVAL_ONLY.items():
                nb = base_cfg.model.num_blocks
                e = evaluate(work / "base", valid_src, num_steps=per_block * nb)
                e.update(variant=label, config=r["config"], train_seconds=0.0)
                rows.append(e)
                print(json.dumps({k: e[k] for k in ("variant", "accuracy", "loss")}), flush=True)
        write_results(args, rows, steps)  # after every variant: a long run keeps what it measured


if __name__ == "__main__":
    main()
