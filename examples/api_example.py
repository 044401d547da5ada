"""DiffusionBlocks through the Python API: a tiny ViT on scikit-learn's digits, fed as a data pipeline
would feed it (a generator of NumPy batches), trained block by block and evaluated.

    PYTHONPATH=python python examples/api_example.py [--steps 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from dbcore import api

CONFIG = {
    "model": {"recipe": "vit", "image_size": 8, "channels": 1, "patch_size": 2, "dim": 32, "depth": 2,
              "heads": 2, "mlp_ratio": 2.0, "num_classes": 10, "num_blocks": 2, "gate_init": 1.0,
              "sigma_dist": "top"},
    "train": {"steps": 200, "batch_size": 64, "warmup_steps": 20, "checkpoint_every": 100,
              "decode": "product"},
}


def digit_batches(batch_size: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """The training 80% of digits (the rows of `digits:train`) in batches of uint8 images and labels."""
    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8), pixels 0..16 -> 0..255
    labels = d.target.astype(np.int64)
    cut = int(0.8 * len(labels))
    for a in range(0, cut, batch_size):
        b = min(a + batch_size, cut)
        yield {"images": images[a:b], "labels": labels[a:b]}


def main(steps: int = 200, out: Path | None = None) -> dict:
    cfg = api.config(CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(out or tmp)
        store = api.cache(cfg, digit_batches(), work / "digits.zarr", overwrite=True)
        for r in api.train(cfg, store, work / "run", steps=steps):
            print(f"trained {r['name']}: {r['steps']} steps")
        report = api.evaluate(work / "run", "digits:valid")
    print(f"DiffusionBlocks ViT: accuracy {report['accuracy']:.3f} "
          f"on {report['num_samples']} held-out digits")
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="training steps per block")
    p.add_argument("--out", type=Path, default=None, help="keep the store and run here (default: a temp dir)")
    args = p.parse_args()
    main(args.steps, args.out)
