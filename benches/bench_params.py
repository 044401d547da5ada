"""Parameters of one block against the end-to-end model's share, per noise conditioning.

A block owns every parameter it uses (embeddings, noise conditioning, readout), so it holds more
than (end-to-end parameters) / B; the adaLN modulation (6 d^2 per layer) is most of the excess.
This counts both conditionings (`[model] conditioning`) on the shipped MNIST config and on the
ViT-B/16 shape (`configs/vit_b16.toml`: 224 px, d = 768, 12 layers, 1000 classes, B = 4). Counting
only: no training.

    python benches/bench_params.py --json benches/results/params_vit.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from dbcore import config as config_mod
from dbcore.recipes import for_config

ROOT = Path(__file__).resolve().parents[1]
VIT_B16 = ROOT / "configs/vit_b16.toml"
VARIANTS = {"adaln": {"conditioning": "adaln"},
            "adaln-single r16": {"conditioning": "adaln-single", "modulation_rank": 16},
            "adaln-single r32": {"conditioning": "adaln-single", "modulation_rank": 32},
            "adaln-single r64": {"conditioning": "adaln-single", "modulation_rank": 64}}


def count(cfg) -> dict:
    recipe = for_config(cfg)
    frozen = recipe.example_frozen()
    e2e = sum(p.numel() for p in recipe.build_e2e(frozen).parameters())
    blocks = [sum(p.numel() for p in recipe.build_block(b, frozen).parameters())
              for b in range(cfg.model.num_blocks)]
    return {"e2e_params": e2e, "block_params": blocks,
            "max_block_over_e2e_share": round(max(blocks) / (e2e / cfg.model.num_blocks), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/vit_mnist.toml"))
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    base = config_mod.load(args.config)
    shapes = {Path(args.config).stem: base.model,
              "vit_b16_224": config_mod.load(VIT_B16).model}
    rows = []
    for shape, model in shapes.items():
        for name, overrides in VARIANTS.items():
            cfg = dataclasses.replace(base, model=dataclasses.replace(model, **overrides))
            rows.append({"shape": shape, "conditioning": name, **count(cfg)})
            print(json.dumps(rows[-1]))
    args.json.write_text(json.dumps({"target": 1.15, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
