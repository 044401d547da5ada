"""Labelled images as a `Source`: rows in memory (digits, npz) or spilled to memmaps in a temporary
folder (decoded shards, folders and Parquet files; the API's batches), never held whole."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbcore.data.decode import ImageFormat, decode_batches
from dbcore.data.hf_dataset import columns, dataset_records
from dbcore.data.image_records import Record, class_names, parse_spec, records
from dbcore.errors import SourceError

HASH_ROWS = 4096  # rows per update when hashing


@dataclass(frozen=True, eq=False)
class Source:
    """Labelled images; arrays that live in a temporary folder are removed by close() or GC."""

    spec: str
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...] | None = None  # class names (folder sources), label i is classes[i]
    _tmp: Path | None = field(default=None, repr=False)
    _finalizer: weakref.finalize | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self._tmp is not None:
            object.__setattr__(self, "_finalizer", weakref.finalize(self, shutil.rmtree, self._tmp, True))

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def sha256(self) -> str:
        """Of the images' bytes then the labels', a few rows at a time."""
        h = hashlib.sha256()
        for rows in (self.images, self.labels):
            for a in range(0, len(rows), HASH_ROWS):
                h.update(np.ascontiguousarray(rows[a:a + HASH_ROWS]).data)
        return h.hexdigest()

    def close(self) -> None:
        """Remove the temporary folder (open mappings stay readable on POSIX)."""
        if self._finalizer is not None:
            self._finalizer()


class Rows:
    """Rows appended to a `.npy` memmap; when full, it is rewritten at twice the capacity."""

    def __init__(self, stem: Path, row_shape: tuple[int, ...], dtype: type) -> None:
        self.stem, self.row_shape, self.dtype = stem, row_shape, np.dtype(dtype)
        self.n, self.files = 0, 0
        self.array: np.memmap | None = None

    def append(self, rows: np.ndarray) -> None:
        end = self.n + len(rows)
        if self.array is None or end > len(self.array):
            self._grow(max(end, 2 * (0 if self.array is None else len(self.array))))
        self.array[self.n:end] = rows
        self.n = end

    def _grow(self, capacity: int) -> None:
        path = Path(f"{self.stem}.{self.files}.npy")
        shape = (capacity, *self.row_shape)
        grown = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=shape)
        self.files += 1
        if self.array is not None:
            grown[:self.n] = self.array[:self.n]
            old, self.array = Path(self.array.filename), None
            old.unlink()
        self.array = grown

    def finish(self) -> np.ndarray:
        """The rows written, read-only."""
        assert self.array is not None
        self.array.flush()
        path, self.array = self.array.filename, None
        return np.load(path, mmap_mode="r")[:self.n]


def spill(spec: str, batches: Iterable[tuple[np.ndarray, np.ndarray]], folder: Path,
          classes: Iterable[str] | None = None) -> Source:
    """A Source of the rows of `batches` ((n, H, W, C) uint8, (n,) int64; every batch of one row
    shape), spilled to memmaps in `folder`, which the Source removes when closed."""
    images = labels = None
    try:
        for x, y in batches:
            if images is None:
                images = Rows(folder / "images", x.shape[1:], np.uint8)
                labels = Rows(folder / "labels", (), np.int64)
            images.append(x)
            labels.append(y)
        if images is None or images.n == 0:
            raise SourceError(f"{spec}: the data holds no image")
        return Source(spec=spec, images=images.finish(), labels=labels.finish(),
                      classes=None if classes is None else tuple(classes), _tmp=folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def load_images(spec: str, fmt: ImageFormat, scratch: Path | None = None) -> Source:
    """Decode every image of a `tar:`, `folder:` or `parquet:` spec to `fmt`, in parallel, into a
    Source spilled to a temporary folder in `scratch` (default: the system's temporary folder)."""
    image_spec = parse_spec(spec)
    return decoded(str(image_spec), records(image_spec), fmt, class_names(image_spec), scratch)


def load_dataset(ds: Any, fmt: ImageFormat, image: str | None = None, label: str | None = None,
                 scratch: Path | None = None) -> Source:
    """A Hugging Face `datasets.Dataset` decoded as `load_images` decodes files (`data.hf_dataset`)."""
    image, label = columns(ds, image, label)
    recs, classes = dataset_records(ds, image, label)
    spec = f"datasets.Dataset({len(ds)} rows, fingerprint {getattr(ds, '_fingerprint', '?')})"
    return decoded(spec, recs, fmt, classes, scratch)


def decoded(spec: str, recs: Iterable[Record], fmt: ImageFormat, classes: Iterable[str] | None = None,
            scratch: Path | None = None) -> Source:
    """The records decoded to `fmt` in parallel, spilled to a temporary folder in `scratch`."""
    folder = Path(tempfile.mkdtemp(prefix="dbcore-images-", dir=scratch))
    return spill(spec, _same_shape(decode_batches(recs, fmt)), folder, classes)


def _same_shape(batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    first = None
    for x, y in batches:
        if first is None:
            first = x.shape[1:]
        elif x.shape[1:] != first:
            raise SourceError(f"images of {x.shape[2]}x{x.shape[1]} after images of {first[1]}x{first[0]}; "
                              "give the config's image_size to resize them")
        yield x, y


__all__ = ["ImageFormat", "Rows", "Source", "decoded", "load_dataset", "load_images", "spill"]
