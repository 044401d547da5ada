"""`dbcore cache`: write a source, its frozen target embedding, schedule and provenance to a store.

With `noise="cached"` it also writes K noised targets (and their sigmas) per sample per block,
drawn by the counter-based generator keyed by (seed, sample index, block, draw): exactly the values
that `noise="online"` training draws on the fly, so both modes and every backend agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from dbcore import layout, store
from dbcore.config import Config
from dbcore.noise import noised_targets
from dbcore.partition import block_range, boundaries
from dbcore.recipes.vit import make_target_embedding
from dbcore.sources import Source

ROWS_PER_WRITE = 4096


def schedule_attrs(cfg: Config) -> dict:
    m = cfg.model
    return {
        "num_blocks": m.num_blocks,
        "gamma": m.gamma,
        "sigma_dist": m.sigma_dist,
        "boundaries": boundaries(m.num_blocks),
        "block_ranges": [list(block_range(b, m.num_blocks, m.gamma)) for b in range(m.num_blocks)],
    }


def write_cache(
    cfg: Config,
    source: Source,
    out: Path,
    noise: Literal["online", "cached"] = "online",
    draws: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> store.Store:
    m = cfg.model
    if noise not in ("online", "cached"):
        raise ValueError(f"noise must be 'online' or 'cached', found {noise!r}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, found {draws}")
    n, h, w, c = source.images.shape
    if (h, w, c) != (m.image_size, m.image_size, m.channels):
        raise ValueError(
            f"source {source.spec}: images are {h}x{w}x{c}, the config expects "
            f"{m.image_size}x{m.image_size}x{m.channels}"
        )
    if source.num_classes > m.num_classes:
        raise ValueError(
            f"source {source.spec}: label {source.num_classes - 1} >= num_classes {m.num_classes}"
        )
    emb = make_target_embedding(m.num_classes, m.dim, seed, m.target_scale)  # (V, d)
    attrs = {
        "format": layout.FORMAT,
        "format_version": layout.FORMAT_VERSION,
        "source": {"spec": source.spec, "sha256": source.sha256(), "num_samples": n},
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "schedule": schedule_attrs(cfg),
        "noise": {"mode": noise, "draws": draws if noise == "cached" else 0, "seed": seed},
        "target_embedding": {"kind": "seeded-random", "seed": seed, "scale": m.target_scale},
    }
    s = store.create(out, attrs=attrs, overwrite=overwrite)
    s.write_array(layout.IMAGES, source.images)
    s.write_array(layout.LABELS, source.labels)
    s.write_array(layout.TARGET_EMBEDDING, emb.numpy())
    if noise == "cached":
        _write_noise(s, cfg, emb, source.labels, draws, seed, progress)
    s.finalize()
    return s


def _write_noise(
    s: store.Store, cfg: Config, emb: torch.Tensor, labels: np.ndarray, draws: int, seed: int, progress: bool
) -> None:
    m = cfg.model
    n = len(labels)
    chunk = max(1, min(ROWS_PER_WRITE, n))
    total = m.num_blocks * draws * ((n + chunk - 1) // chunk)
    bar = tqdm(total=total, desc="noised targets", unit="chunk", disable=not progress)
    for b in range(m.num_blocks):
        zw = s.array_writer(layout.noised_z(b), (n, draws, m.dim), "float32", chunks=(chunk, draws, m.dim))
        sw = s.array_writer(layout.noised_sigma(b), (n, draws), "float32", chunks=(chunk, draws))
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(n, start + chunk))
            y = emb[torch.from_numpy(labels[start : start + chunk])]  # (n, d)
            zs, sigmas = [], []
            for k in range(draws):
                z, sigma = noised_targets(y, idx, seed, b, k, m)
                zs.append(z)
                sigmas.append(sigma)
                bar.update(1)
            zw.write(start, torch.stack(zs, dim=1).float().numpy())  # (n, K, d)
            sw.write(start, torch.stack(sigmas, dim=1).float().numpy())  # (n, K)
    bar.close()
