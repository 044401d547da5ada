"""Encoded images (JPEG, PNG, WebP) to uint8 rows of one shape, decoded `CHUNK` at a time in
parallel by the Rust extension (`rust/src/decode.rs`: zune-jpeg, png, image-webp; the GIL
released), which `benches/bench_decode.py` measured against Pillow in a pool. Pillow (`decode`)
is the reference of the same rules; it decodes what the extension cannot and names a file that
neither can, and it decodes sources without a size.

An image of another size is resized so that its shorter side is `size` (bicubic, antialiased when
shrinking; the longer side rounded half up), then centre-cropped to `size` x `size` (the offset
rounded down), as torchvision's `Resize(size)` + `CenterCrop(size)`. Colour images become
grey-scale (Pillow's `L`: ITU-R 601-2 luma) for one channel; anything becomes RGB for three (an
alpha channel is dropped).
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dbcore import _native
from dbcore.data.image_records import Record
from dbcore.errors import SourceError

CHUNK = 256  # images per task handed to the pool (decoded in parallel in it by the extension)


@dataclass(frozen=True)
class ImageFormat:
    """The rows an image recipe caches: `size` x `size` x `channels` (`size` None: as decoded, every
    image the same size), labels below `num_classes` (None: any)."""

    size: int | None = None
    channels: int = 3
    num_classes: int | None = None


def decode(data: bytes, where: str, fmt: ImageFormat) -> np.ndarray:
    """One image as uint8 (H, W, C) in `fmt`; an unreadable one is a SourceError naming `where`."""
    from PIL import Image

    mode = "L" if fmt.channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SourceError(f"{where}: not a readable image ({exc})") from None
    if fmt.size is not None:
        im = _resize_crop(im, fmt.size)
    rows = np.asarray(im, dtype=np.uint8)
    return rows[..., None] if rows.ndim == 2 else rows


def _resize_crop(im, size: int):
    from PIL import Image

    w, h = im.size
    if (w, h) != (size, size):
        w2, h2 = resized_dims(w, h, size)
        im = im.resize((w2, h2), Image.Resampling.BICUBIC, reducing_gap=None)
        left, top = (w2 - size) // 2, (h2 - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


def resized_dims(w: int, h: int, size: int) -> tuple[int, int]:
    """The resized size of (w, h): the shorter side `size`, the longer one scaled, rounded half up."""
    short, long = min(w, h), max(w, h)
    scaled = max(size, (2 * long * size + short) // (2 * short))
    return (size, scaled) if w <= h else (scaled, size)


def _decode_chunk(chunk: list[Record], fmt: ImageFormat) -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([r.label for r in chunk], dtype=np.int64)
    if fmt.size is not None:
        out = np.empty((len(chunk), fmt.size, fmt.size, fmt.channels), dtype=np.uint8)
        for i, _ in _native.decode_images([r.data for r in chunk], fmt.size, fmt.channels, out):
            out[i] = decode(chunk[i].data, chunk[i].where, fmt)  # Pillow: decodes it, or names it
        return out, labels
    rows = [decode(r.data, r.where, fmt) for r in chunk]
    first = rows[0].shape
    for r, row in zip(chunk, rows, strict=True):
        if row.shape != first:  # only without a size: every image must then be the same size
            raise SourceError(f"{r.where}: image is {row.shape[1]}x{row.shape[0]}, the ones before it "
                              f"{first[1]}x{first[0]}; give the config's image_size to resize them")
    return np.stack(rows), labels


def decode_batches(recs: Iterable[Record], fmt: ImageFormat, workers: int | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images (n, H, W, C) uint8, labels (n,) int64) of `recs` in order, `CHUNK` at a time,
    decoded by `workers` threads (default: one per CPU); at most two chunks a thread in memory."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers, thread_name_prefix="dbcore-decode") as pool:
        pending: deque[Future] = deque()
        for chunk in _chunks(recs, fmt):
            pending.append(pool.submit(_decode_chunk, chunk, fmt))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chunks(recs: Iterable[Record], fmt: ImageFormat) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for r in recs:
        if fmt.num_classes is not None and r.label >= fmt.num_classes:
            raise SourceError(f"{r.where}: label {r.label} is out of range: the config has "
                              f"num_classes {fmt.num_classes}")
        chunk.append(r)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
