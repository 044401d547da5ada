"""A Hugging Face `datasets.Dataset` of labelled images, taken as it is: its image column read as the
encoded bytes (`Image(decode=False)`, so `datasets` decodes nothing), its label column as integers,
the class names of a `ClassLabel` kept. The records then go through the same decoding as files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dbcore.data.image_records import Record
from dbcore.errors import SourceError

BATCH_ROWS = 256


def is_hf_dataset(data: Any) -> bool:
    """True for a `datasets.Dataset` (told by its type, without importing `datasets`)."""
    return type(data).__module__.startswith("datasets.") and hasattr(data, "features")


def _kind(feature: Any) -> str:
    return type(feature).__name__


def columns(ds: Any, image: str | None = None, label: str | None = None) -> tuple[str, str]:
    """(image column, label column): as named, else the one `Image` column and the one `ClassLabel`
    column (or `label`)."""
    features = ds.features
    if image is None:
        found = [name for name, f in features.items() if _kind(f) == "Image"]
        if len(found) != 1:
            raise SourceError(f"datasets.Dataset: expected one Image column, found {found or 'none'} "
                              f"(columns {list(features)})")
        image = found[0]
    if label is None:
        found = [name for name, f in features.items() if _kind(f) == "ClassLabel"]
        label = found[0] if len(found) == 1 else "label"
    for name, what in ((image, "image"), (label, "label")):
        if name not in features:
            raise SourceError(f"datasets.Dataset: no {what} column {name!r} (columns {list(features)})")
    if _kind(features[image]) != "Image":
        raise SourceError(f"datasets.Dataset: column {image!r} is {features[image]}, expected an Image")
    return image, label


def dataset_records(ds: Any, image: str, label: str) -> tuple[Iterator[Record], list[str] | None]:
    """The records of `ds` in row order, and the class names of a `ClassLabel` label column."""
    import datasets

    names = getattr(ds.features[label], "names", None)
    raw = ds.select_columns([image, label]).cast_column(image, datasets.Image(decode=False))

    def records() -> Iterator[Record]:
        row = 0
        for batch in raw.iter(batch_size=BATCH_ROWS):
            for encoded, y in zip(batch[image], batch[label], strict=True):
                where = f"datasets.Dataset row {row}"
                if not isinstance(y, int) or y < 0:
                    raise SourceError(f"{where}: label column {label!r} must be a non-negative integer, "
                                      f"found {y!r}")
                yield Record(_bytes(encoded, where), y, where)
                row += 1

    return records(), None if names is None else list(names)


def _bytes(encoded: Any, where: str) -> bytes:
    if not encoded or not (encoded.get("bytes") or encoded.get("path")):
        raise SourceError(f"{where}: the image holds neither bytes nor a path")
    if encoded.get("bytes"):
        return encoded["bytes"]
    try:
        return Path(encoded["path"]).read_bytes()
    except OSError as exc:
        raise SourceError(f"{where}: cannot read {encoded['path']} ({exc.strerror})") from None
