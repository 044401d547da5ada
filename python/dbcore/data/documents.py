"""Text corpora as documents, streamed in pieces: `text:PATTERN`, `jsonl:PATTERN[#FIELD]`,
`parquet:PATTERN[#COLUMN]`, each PATTERN a file, a glob, or an `s3://` URL of either (read
through s3fs, `pip install 'dbcore[s3]'`). Files are taken in sorted order.

- `text:`: each file is one UTF-8 document (a NUL byte or invalid UTF-8 is refused as binary).
- `jsonl:`: each non-blank line is a JSON object whose FIELD (default `text`) is one document.
- `parquet:`: each row's COLUMN (default `text`) is one document (Hugging Face `datasets` layout),
  read in record batches.

A document reaches the tokenizer as pieces of about `PIECE_BYTES`, cut after a newline where there
is one (a cut inside a word could change its tokens), so nothing is ever held whole.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dbcore.data.location import glob_files, is_url, open_file
from dbcore.data.parquet import parquet_batches
from dbcore.errors import SourceError

PIECE_BYTES = 1 << 16  # text per piece, about: a batch of pieces is encoded in parallel
PARQUET_BATCH_ROWS = 1024
DEFAULT_FIELD = "text"
KINDS = ("text", "jsonl", "parquet")  # also dbcore.data.sources.TEXT_KINDS


@dataclass(frozen=True)
class DocumentSpec:
    kind: str  # text, jsonl or parquet
    pattern: str
    field: str  # jsonl field or parquet column ("" for text)

    def __str__(self) -> str:
        return f"{self.kind}:{self.pattern}" + (f"#{self.field}" if self.field != _default(self.kind) else "")


@dataclass(frozen=True)
class Piece:
    """Part of a document: its text, where it comes from (for messages), the line of its first
    character in that file and the characters before it on that line (text files; else 0, 0),
    and whether the document ends with it."""

    text: str
    where: str
    line: int
    column: int
    last: bool


def _default(kind: str) -> str:
    return "" if kind == "text" else DEFAULT_FIELD


def parse_spec(spec: str) -> DocumentSpec:
    """A source spec of one of `KINDS`; a bare path is `text:PATH`."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        kind, rest = "text", spec
    pattern, _, field = rest.partition("#") if kind != "text" else (rest, "", "")
    if not pattern:
        raise SourceError(f"text source {spec!r} names no file: expected '{kind}:PATTERN'")
    return DocumentSpec(kind, pattern, field or _default(kind))


def files(spec: DocumentSpec) -> list[str]:
    """The files of `spec`'s pattern, sorted; none is a SourceError."""
    if not is_url(spec.pattern) and os.path.isdir(spec.pattern):
        raise SourceError(f"{spec.pattern}: is a directory, expected a file or a glob of files "
                          f"(e.g. {spec.kind}:{os.path.join(spec.pattern, '*')})")
    found = glob_files(spec.pattern)
    if not found:
        raise SourceError(f"{spec.kind} source {spec.pattern!r} matches no file")
    return found


def documents(spec: DocumentSpec) -> Iterator[Piece]:
    """Every document of `spec` in order, as pieces."""
    read = {"text": _text_file, "jsonl": _jsonl_file, "parquet": _parquet_file}[spec.kind]
    for path in files(spec):
        yield from read(path, spec.field)


def document_texts(spec: str) -> list[str]:
    """Every document of a corpus spec, whole (for small corpora such as a file of prompts)."""
    texts, parts = [], []
    for piece in documents(parse_spec(spec)):
        parts.append(piece.text)
        if piece.last:
            texts.append("".join(parts))
            parts = []
    return texts


# ---------------------------------------------------------------------------------------- text


def _text_file(path: str, field: str) -> Iterator[Piece]:
    """The file as one document, in pieces cut after a newline."""
    carry, line, column = "", 1, 0
    for text in _chunks(path):
        text = carry + text
        cut = text.rfind("\n") + 1
        if cut == 0 and len(text) < 4 * PIECE_BYTES:  # no newline yet: wait for one (bounded)
            carry = text
            continue
        cut = cut or len(text)
        piece, carry = text[:cut], text[cut:]
        yield Piece(piece, path, line, column, False)
        nl = piece.rfind("\n")
        line, column = line + piece.count("\n"), column + len(piece) if nl < 0 else len(piece) - nl - 1
    yield Piece(carry, path, line, column, True)


def _chunks(path: str) -> Iterator[str]:
    """Decoded chunks of the file; a NUL byte or invalid UTF-8 (whichever is first) is a SourceError."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    pos = 0
    with open_file(path) as f:
        try:
            while raw := f.read(PIECE_BYTES):
                yield _decode(path, decoder, raw, pos, final=False)
                pos += len(raw)
        except OSError as exc:
            raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if pos == 0:
        raise SourceError(f"{path}: text file is empty")
    yield _decode(path, decoder, b"", pos, final=True)


def _decode(path: str, decoder: codecs.IncrementalDecoder, raw: bytes, pos: int, final: bool) -> str:
    """Decode raw (at byte offset pos); decoder's pending bytes from the last chunk come first."""
    nul = raw.find(b"\0")
    pending = decoder.getstate()[0]
    try:
        text = decoder.decode(raw, final=final)
    except UnicodeDecodeError as exc:
        offset = pos - len(pending) + exc.start
        if nul < 0 or offset < pos + nul:
            raise SourceError(f"{path}: not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset "
                              f"{offset} ({exc.reason})") from None
    if nul >= 0:
        raise SourceError(f"{path}: looks binary: NUL byte at offset {pos + nul}")
    return text


# ---------------------------------------------------------------------------------------- jsonl


def _jsonl_file(path: str, field: str) -> Iterator[Piece]:
    with open_file(path) as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}: line {n}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SourceError(f"{where}: not JSON ({exc})") from None
            yield _record(record, field, where, f"field {field!r}", "a JSON object")


def _record(record: Any, field: str, where: str, what: str, container: str) -> Piece:
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected {container} with {what}, found {type(record).__name__}")
    if field not in record:
        raise SourceError(f"{where}: no {what} (found {sorted(record)[:8]})")
    text = record[field]
    if not isinstance(text, str):
        raise SourceError(f"{where}: {what} must be a string, found {type(text).__name__}")
    return Piece(text, f"{where} ({what})", 0, 0, True)


# ---------------------------------------------------------------------------------------- parquet


def _parquet_file(path: str, column: str) -> Iterator[Piece]:
    import pyarrow as pa

    with parquet_batches(path, [column], PARQUET_BATCH_ROWS) as (schema, batches):
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise SourceError(f"{path}: column {column!r} is {kind}, expected strings")
        for row, batch in batches:
            for i, text in enumerate(batch.column(0).to_pylist()):
                if text is None:
                    raise SourceError(f"{path}: row {row + i}: column {column!r} is null")
                yield Piece(text, f"{path}: row {row + i} (column {column!r})", 0, 0, True)
