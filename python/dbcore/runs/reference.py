"""The FID reference network of a generating run: trained once on the run's training store (and a
held-out source for its accuracy), cached as safetensors + JSON under a key of its training source,
seed and settings (`dbcore.metrics.fid`), and handed to the recipe's evaluation."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dbcore.data import store
from dbcore.data.decode import ImageFormat
from dbcore.data.sources import load_source
from dbcore.method import layout
from dbcore.method.options import FidReference
from dbcore.metrics.fid import (
    DEFAULT_BATCH_SIZE,
    FID_VERSION,
    RefNet,
    auto_epochs,
    cache_key,
    train_reference,
)
from dbcore.runs import checkpoint


def fid_reference(store_path: Any, valid_spec: str) -> FidReference:
    """The reference classifier of the images in `store_path` (a run's training store), its
    accuracy measured on source `valid_spec`; trained once and cached."""
    s = store.open(store_path)
    images, labels = s.read(layout.IMAGES), s.read(layout.LABELS)

    _, size, _, channels = images.shape
    valid = load_source(valid_spec, image=ImageFormat(size, channels))

    def make_data():
        return images, labels, np.asarray(valid.images), valid.labels

    sha = s.attrs.get("source", {}).get("sha256", "")
    net, meta = reference_classifier(sha, make_data, seed=0)
    return FidReference(net.eval(), meta, images)


def _default_cache_dir() -> Path:
    env = os.environ.get("DBCORE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dbcore" / "fid"


def reference_classifier(
    train_source_sha256: str,
    make_data: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    cache_dir: Path | None = None,
    seed: int = 0,
    epochs: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    feature_dim: int = 128,
    threads: int | None = None,
) -> tuple[RefNet, dict[str, Any]]:
    """The reference RefNet for a training source, loaded from the cache or trained once and cached.

    make_data() -> (train images, train labels, valid images, valid labels), uint8 images; it is called
    only on a cache miss. A cached pair whose tensors do not match their recorded sha256 raises
    `dbcore.checkpoint.CheckpointError` (delete the pair to retrain). Returns the network in eval mode
    and its metadata (valid accuracy, seed, epochs, source sha, sizes).
    """
    key = cache_key(train_source_sha256, seed, epochs, batch_size, feature_dim)
    base = Path(cache_dir if cache_dir is not None else _default_cache_dir()) / f"refnet-{key}"
    if checkpoint.exists(base):
        tensors, meta = checkpoint.load(base)
        net = RefNet(meta["channels"], meta["image_size"], meta["num_classes"], meta["feature_dim"])
        checkpoint.load_into(net, tensors, f"checkpoint {base} (RefNet)")
        return net.eval(), meta
    images, labels, valid_images, valid_labels = make_data()
    start = time.perf_counter()
    net, acc = train_reference(
        images, labels, valid_images, valid_labels, seed=seed, epochs=epochs, batch_size=batch_size,
        threads=threads, feature_dim=feature_dim,
    )
    meta = dict(
        net.sizes, key=key, fid_version=FID_VERSION, train_source_sha256=train_source_sha256, seed=seed,
        epochs=epochs if epochs is not None else auto_epochs(len(images), batch_size), batch_size=batch_size,
        valid_accuracy=acc, train_seconds=time.perf_counter() - start,
        num_train=len(images), num_valid=len(valid_images),
    )
    sha = checkpoint.save(base, net.state_dict(), meta)
    return net, {**meta, "sha256": sha}
