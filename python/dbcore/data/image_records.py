"""Labelled images as users keep them, read as encoded records in a fixed order, never held whole:

- `tar:PATTERN`: WebDataset shards (a file, a glob, or a brace range such as
  `train-{00000..00002}.tar`), in sorted order. A sample is the consecutive members that share a
  key (the member's name up to the first dot of its base name); its image is the `.jpg`, `.jpeg`,
  `.png` or `.webp` member, its label the `.cls` member (an integer as text) or the `.json` one
  (its `"label"`).
- `folder:DIR`: one sub-folder per class, the class index being the position of the folder's name
  in sorted order (torchvision's ImageFolder rule); the images in a class folder (and its own
  sub-folders) in sorted order. The class names are kept in the store.
- `parquet:PATTERN[#IMAGE,LABEL]`: the layout Hugging Face `datasets` writes: an image column (a
  struct with `bytes` and `path`, or plain binary; default `image`) and an integer label column
  (default `label`), read in record batches.

Every PATTERN or DIR may be an `s3://` URL (read through s3fs, `pip install 'dbcore[s3]'`).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from dbcore.data.location import glob_files, is_url, open_file, s3_filesystem
from dbcore.data.parquet import parquet_batches
from dbcore.errors import SourceError

KINDS = ("tar", "folder", "parquet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LABEL_SUFFIXES = (".cls", ".json")
PARQUET_COLUMNS = ("image", "label")
PARQUET_BATCH_ROWS = 256
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class ImageSpec:
    kind: str  # tar, folder or parquet
    pattern: str
    columns: tuple[str, str] = PARQUET_COLUMNS  # parquet: (image, label)

    def __str__(self) -> str:
        tail = "" if self.columns == PARQUET_COLUMNS else "#" + ",".join(self.columns)
        return f"{self.kind}:{self.pattern}{tail}"


@dataclass(frozen=True)
class Record:
    """One encoded image: its bytes, its label, and where it comes from (for messages)."""

    data: bytes
    label: int
    where: str


def parse_spec(spec: str) -> ImageSpec:
    """An image source spec of one of `KINDS`."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS or not rest:
        raise SourceError(f"image source {spec!r}: expected 'tar:PATTERN', 'folder:DIR' or "
                          "'parquet:PATTERN[#IMAGE,LABEL]'")
    if kind != "parquet":
        return ImageSpec(kind, rest)
    pattern, sep, names = rest.partition("#")
    columns = tuple(c.strip() for c in names.split(",")) if sep else PARQUET_COLUMNS
    if len(columns) != 2 or not all(columns):
        raise SourceError(f"image source {spec!r}: after '#' expected 'IMAGE,LABEL' column names, "
                          f"found {names!r}")
    return ImageSpec(kind, pattern, (columns[0], columns[1]))


Part = tuple[str, int]  # a file of a source, and its label (folder sources) or -1 (many samples)


def parts(spec: ImageSpec) -> tuple[list[Part], list[str] | None]:
    """The files of `spec` in order, and the class names of a `folder:` source (label i is name i;
    None for the other kinds)."""
    if spec.kind == "folder":
        names, items = folder_items(spec.pattern)
        return items, names
    return [(path, -1) for path in expand(spec.pattern, spec.kind)], None


def part_records(spec: ImageSpec, part: Part) -> Iterator[Record]:
    """The labelled images of one file of `spec`, in order."""
    path, label = part
    if spec.kind == "tar":
        yield from _tar_records(path)
    elif spec.kind == "folder":
        yield Record(_read(path), label, path)
    else:
        yield from _parquet_records(path, *spec.columns)


def records(spec: ImageSpec) -> Iterator[Record]:
    """Every labelled image of `spec`, in order."""
    for part in parts(spec)[0]:
        yield from part_records(spec, part)


def class_names(spec: ImageSpec) -> list[str] | None:
    """The class names of a `folder:` source (label i is name i); None for the other kinds."""
    return parts(spec)[1] if spec.kind == "folder" else None


# ---------------------------------------------------------------------------------------- files


def expand(pattern: str, kind: str) -> list[str]:
    """The files of a pattern (brace ranges expanded, then globs), sorted; none is a SourceError."""
    found: set[str] = set()
    for p in _braces(pattern):
        found.update(glob_files(p))
    if not found:
        raise SourceError(f"{kind} source {pattern!r} matches no file")
    return sorted(found)


def _braces(pattern: str) -> list[str]:
    """WebDataset's `{00000..00002}` ranges, zero-padded as written."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") else 0
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [out for i in range(int(a), int(b) + 1) for out in _braces(f"{head}{i:0{width}d}{tail}")]


def _read(path: str) -> bytes:
    with open_file(path) as f:
        try:
            return f.read()
        except OSError as exc:
            raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------- tar


def _tar_records(path: str) -> Iterator[Record]:
    """The samples of one shard, read as a stream (members in the order written)."""
    key, members = None, {}
    with open_file(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    stem, dot, suffix = base.partition(".")
                    name_key = member.name[:len(member.name) - len(base)] + stem
                    if name_key != key:
                        if key is not None:
                            yield _tar_sample(path, key, members)
                        key, members = name_key, {}
                    if dot and "." + suffix.lower() in IMAGE_SUFFIXES + LABEL_SUFFIXES:
                        data = tar.extractfile(member)
                        members["." + suffix.lower()] = data.read() if data else b""
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise SourceError(f"{path}: not a readable tar shard ({exc})") from None
    if key is None:
        raise SourceError(f"{path}: tar shard holds no sample")
    yield _tar_sample(path, key, members)


def _tar_sample(path: str, key: str, members: dict[str, bytes]) -> Record:
    where = f"{path}: sample {key!r}"
    images = [s for s in IMAGE_SUFFIXES if s in members]
    if not images:
        raise SourceError(f"{where}: no image member (expected one of {', '.join(IMAGE_SUFFIXES)}); "
                          f"found {sorted(members) or 'none of them'}")
    if ".cls" in members:
        text = members[".cls"].decode(errors="replace").strip()
        if not re.fullmatch(r"\d+", text):
            raise SourceError(f"{where}: .cls must hold a non-negative integer, found {text[:40]!r}")
        label = int(text)
    elif ".json" in members:
        try:
            meta = json.loads(members[".json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(f"{where}: .json is not JSON ({exc})") from None
        label = meta.get("label") if isinstance(meta, dict) else None
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise SourceError(f"{where}: .json needs a non-negative integer 'label', found {label!r}")
    else:
        raise SourceError(f"{where}: no label (expected a .cls or a .json member with 'label')")
    return Record(members[images[0]], label, where)


# ---------------------------------------------------------------------------------------- folder


def folder_items(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(image path, label)]) of a class-folder tree, both sorted."""
    root = root.rstrip("/")
    if is_url(root):
        fs = s3_filesystem(SourceError, "sources")
        try:
            files = [f"s3://{p}" for p in fs.find(root)]
        except Exception as exc:
            raise SourceError(f"{root}: cannot list ({exc})") from None
    else:
        if not os.path.isdir(root):
            raise SourceError(f"folder source {root!r} is not a directory")
        files = [os.path.join(d, f) for d, _, names in os.walk(root, followlinks=True) for f in names]
    by_class: dict[str, list[str]] = {}
    for path in files:
        rel = path[len(root) + 1:]
        if "/" in rel:  # files at the top level are not in a class
            by_class.setdefault(rel.split("/", 1)[0], []).append(path)
    names = sorted(by_class)
    if not names:
        raise SourceError(f"folder source {root!r} has no class sub-folder (expected DIR/CLASS/IMAGE)")
    items = []
    for label, name in enumerate(names):
        images = sorted(p for p in by_class[name] if p.lower().endswith(IMAGE_SUFFIXES))
        if not images:
            raise SourceError(f"{root}/{name}: class folder holds no image "
                              f"(expected files ending {', '.join(IMAGE_SUFFIXES)})")
        items += [(p, label) for p in images]
    return names, items


# ---------------------------------------------------------------------------------------- parquet


def _parquet_records(path: str, image: str, label: str) -> Iterator[Record]:
    import pyarrow as pa

    with parquet_batches(path, [image, label], PARQUET_BATCH_ROWS) as (schema, batches):
        image_type, label_type = schema.field(image).type, schema.field(label).type
        if not pa.types.is_integer(label_type):
            raise SourceError(f"{path}: label column {label!r} is {label_type}, expected integers")
        in_struct = pa.types.is_struct(image_type)
        if in_struct and image_type.get_field_index("bytes") < 0:
            raise SourceError(f"{path}: image column {image!r} is a struct without 'bytes' ({image_type})")
        if not in_struct and not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
            raise SourceError(f"{path}: image column {image!r} is {image_type}, expected a struct with "
                              "'bytes' or binary")
        for row, batch in batches:
            images, labels = batch.column(0), batch.column(1)
            if in_struct:
                images = images.field("bytes")
            for i, (data, y) in enumerate(zip(images.to_pylist(), labels.to_pylist(), strict=True)):
                where = f"{path}: row {row + i}"
                if data is None:
                    raise SourceError(f"{where}: image column {image!r} holds no bytes")
                if y is None or y < 0:
                    raise SourceError(f"{where}: label column {label!r} must be a non-negative integer, "
                                      f"found {y}")
                yield Record(data, y, where)
