"""Labelled images as a `Source`: rows in memory (digits, npz), decoded on demand from the files of
a `tar:`, `folder:` or `parquet:` source (`LazyImages`: a cache decodes each write's rows as it
writes them, and a Ray task only its own), or spilled to memmaps in a temporary folder (the API's
batches, a `datasets.Dataset`, files without a target size): never held whole."""

from __future__ import annotations

import array
import bisect
import hashlib
import itertools
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbcore.data.decode import ImageFormat, decode_batches
from dbcore.data.hf_dataset import columns, dataset_records
from dbcore.data.image_records import (
    ImageSpec,
    Part,
    Record,
    class_names,
    parse_spec,
    part_records,
    parts,
    records,
)
from dbcore.errors import SourceError

HASH_ROWS = 4096  # rows per update when hashing


@dataclass(frozen=True, eq=False)
class Source:
    """Labelled images; arrays that live in a temporary folder are removed by close() or GC."""

    spec: str
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...] | None = None  # class names (folder sources), label i is classes[i]
    digest: str | None = None  # the provenance digest when it is not of the rows (`LazyImages`)
    _tmp: Path | None = field(default=None, repr=False)
    _finalizer: weakref.finalize | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self._tmp is not None:
            object.__setattr__(self, "_finalizer", weakref.finalize(self, shutil.rmtree, self._tmp, True))

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def sha256(self) -> str:
        """Of the images' bytes then the labels', a few rows at a time (or the `digest` given)."""
        if self.digest is not None:
            return self.digest
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


class LazyImages:
    """The (N, size, size, C) uint8 images of a file source, decoded when rows are read: a range
    starts at the file that holds its first row, and a read that starts where the last one ended
    goes on with the same pass over the files."""

    def __init__(self, spec: ImageSpec, parts: list[Part], first_rows: list[int], n: int, fmt: ImageFormat):
        assert fmt.size is not None
        self.spec, self.parts, self.first_rows, self.fmt = spec, parts, first_rows, fmt
        self.shape = (n, fmt.size, fmt.size, fmt.channels)
        self.dtype, self.ndim = np.dtype(np.uint8), 4
        self._cursor: tuple[int, Iterator[Record]] | None = None  # (next row, its records)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice) and key.step in (None, 1):
            a, b, _ = key.indices(len(self))
            return self._rows(a, max(a, b))
        if isinstance(key, (int, np.integer)):
            return self._rows(int(key) % len(self), int(key) % len(self) + 1)[0]
        return self._rows(0, len(self))[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = self._rows(0, len(self))
        return rows if dtype is None else rows.astype(dtype)

    def _records_from(self, row: int) -> Iterator[Record]:
        part = bisect.bisect_right(self.first_rows, row) - 1
        recs = (r for p in self.parts[part:] for r in part_records(self.spec, p))
        return itertools.islice(recs, row - self.first_rows[part], None)

    def _rows(self, a: int, b: int) -> np.ndarray:
        recs = self._cursor[1] if self._cursor and self._cursor[0] == a else self._records_from(a)
        out = np.empty((b - a, *self.shape[1:]), dtype=np.uint8)
        done = 0
        for images, _ in decode_batches(itertools.islice(recs, b - a), self.fmt):
            out[done:done + len(images)] = images
            done += len(images)
        if done != b - a:
            raise SourceError(f"{self.spec}: {done} images from row {a}, expected {b - a}: the files "
                              "changed since they were indexed")
        self._cursor = (b, recs)
        return out


def load_images(spec: str, fmt: ImageFormat, scratch: Path | None = None) -> Source:
    """The images of a `tar:`, `folder:` or `parquet:` spec decoded to `fmt`: `LazyImages` when
    `fmt` has a size (after one pass that reads every record, decodes none, and takes the labels
    and a digest of the encoded bytes), else all decoded in parallel into a Source spilled to a
    temporary folder in `scratch` (default: the system's temporary folder)."""
    image_spec = parse_spec(spec)
    if fmt.size is None:
        return decoded(str(image_spec), records(image_spec), fmt, class_names(image_spec), scratch)
    files, classes = parts(image_spec)
    h = hashlib.sha256(f"{fmt.size} {fmt.channels}".encode())
    labels, first_rows = array.array("q"), []  # 8 bytes a label, however many
    for part in files:
        first_rows.append(len(labels))
        for r in part_records(image_spec, part):
            if fmt.num_classes is not None and r.label >= fmt.num_classes:
                raise SourceError(f"{r.where}: label {r.label} is out of range: the config has "
                                  f"num_classes {fmt.num_classes}")
            h.update(len(r.data).to_bytes(8, "little") + r.data + r.label.to_bytes(8, "little"))
            labels.append(r.label)
    if not labels:
        raise SourceError(f"{image_spec}: the data holds no image")
    images = LazyImages(image_spec, files, first_rows, len(labels), fmt)
    return Source(spec=str(image_spec), images=images, labels=np.frombuffer(labels, dtype=np.int64).copy(),  # type: ignore[arg-type]
                  classes=None if classes is None else tuple(classes), digest=h.hexdigest())


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


__all__ = ["ImageFormat", "LazyImages", "Rows", "Source", "decoded", "load_dataset", "load_images", "spill"]
