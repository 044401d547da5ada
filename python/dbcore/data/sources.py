"""Data sources by spec: labelled images and text corpora.

Images: `digits`, `digits:train`, `digits:valid` (scikit-learn's, the embedded default; a fixed
80/20 split in source order), `npz:PATH` (arrays `images` uint8 (N, H, W) or (N, H, W, C) and
`labels` integer (N,)), and `tar:`, `folder:` and `parquet:` (encoded images, decoded in parallel
to the recipe's size and channels: `dbcore.data.image_records`). Rows stay in source order, as
uint8 (N, H, W, C).

Text: `text:`, `jsonl:` and `parquet:` (streamed and tokenized: `dbcore.data.text`). A `parquet:`
spec is a text corpus for a language recipe and labelled images for an image recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dbcore.config import Config
from dbcore.data.decode import ImageFormat
from dbcore.data.image_records import KINDS as IMAGE_KINDS
from dbcore.data.images import Source, load_images
from dbcore.errors import SourceError

DIGITS_TRAIN_FRACTION = 0.8
TEXT_KINDS = ("text", "jsonl", "parquet")  # dbcore.data.documents.KINDS


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


def image_format(model: Any) -> ImageFormat | None:
    """What an image recipe's config `model` caches (None for a text recipe)."""
    if not hasattr(model, "image_size"):
        return None
    return ImageFormat(model.image_size, model.channels, model.num_classes)


def source_tokenizer(cfg: Config) -> str:
    """The tokenizer `cfg` caches a text corpus with: its `[model] tokenizer` (`char` for images)."""
    return getattr(cfg.model, "tokenizer", "char")


def load_source_for(cfg: Config, spec: str) -> Any:
    """The source `spec` as `cfg` caches it (a text corpus through its `[model] tokenizer`, encoded
    images decoded to its image size and channels)."""
    return load_source(spec, source_tokenizer(cfg), image_format(cfg.model))


def load_source(spec: str, tokenizer: str = "char", image: ImageFormat | None = None) -> Any:
    """Load a source by its spec (see the module docstring): a `Source` (encoded images decoded to
    `image`, default: as found, RGB), or a `dbcore.data.text.TextSource` tokenized by `tokenizer`
    (a `[model] tokenizer` value). `image` given makes `parquet:` an image source."""
    kind, _, arg = spec.partition(":")
    if kind in IMAGE_KINDS and arg and (kind != "parquet" or image is not None):
        return load_images(spec, image or ImageFormat())
    if kind in TEXT_KINDS and arg:
        from dbcore.data.text import load_text

        return load_text(spec, tokenizer)
    if kind == "digits":
        images, labels = _digits(arg or None)
    elif kind == "npz" and arg:
        images, labels = _npz(Path(arg))
    else:
        raise SourceError(f"unknown data source {spec!r}: expected images as 'digits[:train|:valid]', "
                          "'npz:PATH', 'tar:PATTERN', 'folder:DIR' or 'parquet:PATTERN[#IMAGE,LABEL]', "
                          "or text as 'text:PATTERN', 'jsonl:PATTERN[#FIELD]' or 'parquet:PATTERN[#COLUMN]'")
    if images.ndim == 3:
        images = images[..., None]
    return Source(spec=spec, images=np.ascontiguousarray(images), labels=labels)
