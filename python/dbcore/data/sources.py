"""Data sources: labelled images, `digits` (scikit-learn's, the embedded default) and `npz:PATH`;
and text corpora, `text:`, `jsonl:` and `parquet:` (streamed and tokenized: `dbcore.data.text`).

Specs: `digits`, `digits:train`, `digits:valid` (a fixed 80/20 split in source order) and
`npz:PATH` with arrays `images` uint8 (N, H, W) or (N, H, W, C) and `labels` integer (N,).
Images are returned as uint8 (N, H, W, C); rows stay in source order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dbcore.errors import SourceError

DIGITS_TRAIN_FRACTION = 0.8
TEXT_KINDS = ("text", "jsonl", "parquet")  # dbcore.data.documents.KINDS


@dataclass(frozen=True)
class Source:
    spec: str
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()


def _digits(split: str | None) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = d.target.astype(np.int64)
    cut = int(len(labels) * DIGITS_TRAIN_FRACTION)
    if split == "train":
        return images[:cut], labels[:cut]
    if split == "valid":
        return images[cut:], labels[cut:]
    if split is None:
        return images, labels
    raise SourceError(f"digits split must be 'train' or 'valid', found {split!r}")


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise SourceError(f"npz source not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"images", "labels"} - set(f.files)
            if missing:
                raise SourceError(f"{path}: missing array(s) {sorted(missing)}; found {f.files}")
            images, labels = f["images"], f["labels"]
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: not a readable npz file ({exc})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise SourceError(
            f"{path}: 'images' must be uint8 (N,H,W) or (N,H,W,C), found {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"{path}: 'labels' must be integer (N,), found {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise SourceError(f"{path}: {len(images)} images but {len(labels)} labels")
    if len(labels) and labels.min() < 0:
        raise SourceError(f"{path}: 'labels' must be non-negative, found {labels.min()}")
    return images, labels.astype(np.int64)


def source_sha256(source: Any) -> str:
    """The content digest recorded as the store's provenance: of the images and labels, or of the
    text file's bytes."""
    return source.sha256 if isinstance(source.sha256, str) else source.sha256()


def load_source(spec: str, tokenizer: str = "char") -> Any:
    """Load a source by its spec (see the module docstring): a `Source`, or a
    `dbcore.data.text.TextSource` tokenized by `tokenizer` (a `[model] tokenizer` value)."""
    kind, _, arg = spec.partition(":")
    if kind in TEXT_KINDS and arg:
        from dbcore.data.text import load_text

        return load_text(spec, tokenizer)
    if kind == "digits":
        images, labels = _digits(arg or None)
    elif kind == "npz" and arg:
        images, labels = _npz(Path(arg))
    else:
        raise SourceError(f"unknown data source {spec!r}: expected 'digits[:train|:valid]', 'npz:PATH', "
                          "'text:PATTERN', 'jsonl:PATTERN[#FIELD]' or 'parquet:PATTERN[#COLUMN]'")
    if images.ndim == 3:
        images = images[..., None]
    return Source(spec=spec, images=np.ascontiguousarray(images), labels=labels)
