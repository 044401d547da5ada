"""Checkpointed block memory against checkpointed end-to-end / B, as layers per block grow.

With activation checkpointing a process keeps one input per layer for backward, plus a part that
does not shrink with B: the gradient at a layer boundary twice (the one arriving and the one
being built), the block's embeddings and readout, and its parameter excess. The baseline pays
that part once for all L layers, a block once for L / B. This measures `dbcore bench memory`'s
ratio on one config at several depths (B fixed), so the fixed part shows as the gap that closes
with depth.

    python benches/bench_memory_depth.py --config configs/vit_mnist_light.toml --depths 8 16 32 \
        --checkpoint-chunks 16 --json benches/results/memory_depth_vit_mnist_light.json
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from dbcore.runs.memory import measure_all

DEPTH_LINE = re.compile(r"^depth\s*=\s*\d+", re.MULTILINE)
RATIOS = ("max_block_over_e2e_per_block", "max_checkpointed_block_over_checkpointed_e2e_per_block")
KEPT = ("num_blocks", "e2e_peak_bytes", "checkpointed_peak_bytes", "block_peak_bytes",
        "block_checkpointed_peak_bytes", "e2e_params", "block_params", *RATIOS)  # of measure_all's


def with_depth(text: str, depth: int) -> str:
    """The config's text with `[model] depth` set to `depth` (its one `depth =` line)."""
    new, n = DEPTH_LINE.subn(f"depth = {depth}", text)
    if n != 1:
        raise ValueError(f"expected one 'depth = N' line in the config, found {n}")
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--depths", type=int, nargs="+", required=True)
    ap.add_argument("--checkpoint-chunks", type=int, default=None)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    text = args.config.read_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            path = Path(tmp) / f"depth{depth}.toml"
            path.write_text(with_depth(text, depth))
            r = measure_all(path, checkpoint_chunks=args.checkpoint_chunks, timed_steps=0)
            rows.append({"depth": depth, "layers_per_block": depth / r["num_blocks"],
                         **{k: r[k] for k in KEPT}})
            print(json.dumps({k: rows[-1][k] for k in ("depth", *RATIOS)}), flush=True)
    out = {"config": str(args.config), "checkpoint_chunks": r["checkpoint_chunks"], "device": r["device"],
           "allocator": r["allocator"], "batch_size": r["batch_size"], "rows": rows}
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
