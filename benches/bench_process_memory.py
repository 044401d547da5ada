"""The memory a user's `dbcore train` process holds, beside the model step's, for shipped configs.

For each config: the model step's peaks (`dbcore bench memory`, fresh processes, synthetic batch)
and the process's (`runs.process_memory`: a short real `train` of the baseline and each block over
the real store, peak RssAnon less the fixed share of imports and the opened store). Stores are
cached first into a scratch folder (or reused from --stores).

    python benches/bench_process_memory.py --steps 60 --json benches/results/process_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from dbcore.runs.memory import measure_all
from dbcore.runs.process_memory import PROCESS_STEPS, measure_process

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
CONFIGS = {  # config -> the source it is cached from
    "vit_mnist": f"npz:{DATA / 'mnist' / 'train.npz'}",
    "dit_mnist": f"npz:{DATA / 'mnist' / 'train.npz'}",
    "mdlm_shakespeare": f"text:{DATA / 'shakespeare' / 'train.txt'}",
    "arlm_shakespeare": f"text:{DATA / 'shakespeare' / 'train.txt'}",
    "looped_shakespeare": f"text:{DATA / 'shakespeare' / 'train.txt'}",
}
VARIANTS = {  # name -> (config, [model] values changed in a copy of it)
    "arlm_shakespeare_t256_d256": ("arlm_shakespeare", {"seq_len": 256, "stride": 128, "dim": 256,
                                                        "target_scale": 8.0}),
}
KEPT = ("num_blocks", "batch_size", "e2e_peak_bytes", "block_peak_bytes", "max_block_over_e2e_per_block")


def variant(name: str, root: Path, scratch: Path) -> Path:
    """The config `name`: a shipped one, or a copy of one with some [model] lines changed."""
    if name not in VARIANTS:
        return root / "configs" / f"{name}.toml"
    base, values = VARIANTS[name]
    text = (root / "configs" / f"{base}.toml").read_text()
    for key, value in values.items():
        text, n = re.subn(rf"^{key}\s*=\s*[^#\n]*", f"{key} = {value} ", text, flags=re.MULTILINE)
        if n != 1:
            raise ValueError(f"{base}.toml: expected one '{key} =' line, found {n}")
    out = scratch / f"{name}.toml"
    out.write_text(text)
    return out


def cached(config: Path, source: str, stores: Path) -> Path:
    """The config's store in `stores`, cached there unless it is already."""
    out = stores / f"{config.stem}.zarr"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "dbcore.cli", "cache", str(config), "--data", source,
                        "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *VARIANTS])
    ap.add_argument("--steps", type=int, default=PROCESS_STEPS)
    ap.add_argument("--allocators", nargs="+", default=["default"], choices=["default", "tight"])
    ap.add_argument("--stores", type=Path, default=None, help="folder of cached stores (kept)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    results = {}
    with tempfile.TemporaryDirectory(prefix="dbcore-stores-") as scratch:
        stores = args.stores or Path(scratch)
        stores.mkdir(parents=True, exist_ok=True)
        for name in args.configs:
            config = variant(name, root, Path(scratch))
            source = CONFIGS[VARIANTS[name][0] if name in VARIANTS else name]
            store = cached(config, source, stores)
            step = measure_all(config, timed_steps=0)
            results[name] = {"model_step": {k: step[k] for k in KEPT}}
            for allocator in args.allocators:
                process = measure_process(config, store, step["num_blocks"], args.steps, allocator)
                results[name][f"process_{allocator}"] = process
                print(json.dumps({name: {"allocator": allocator,
                                         "model_step_ratio": step["max_block_over_e2e_per_block"],
                                         **{k: process[k] for k in ("max_block_over_e2e",
                                                                    "max_block_over_e2e_beyond_fixed")}}}),
                      flush=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"steps": args.steps, "cpu_count": os.cpu_count(), "configs": results},
                              indent=1))
    tmp.rename(args.json)


if __name__ == "__main__":
    main()
