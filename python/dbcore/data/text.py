"""Text sources for the language-model recipes: a corpus (`dbcore.data.documents`: `text:`,
`jsonl:`, `parquet:`, local or `s3://`) tokenized into one flat stream of token ids.

Documents are streamed in pieces, never held whole. Pass 1 (when no tokenizer is given) builds
the tokenizer from the corpus: the character set for `char`, a trained BPE for `bpe:N`, the file
for `file:PATH`. Pass 2 encodes batches of pieces (`ENCODE_BATCH_BYTES`, in parallel for the
Hugging Face tokenizers) and appends the ids, with the tokenizer's separator between documents, to
a temporary file, mapped read-only when complete: uint16 for a vocabulary of at most 65,536 tokens,
else uint32. `TextSource.windows(seq_len, stride)` views it as rows (evaluation reads these).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dbcore.data.documents import DocumentSpec, Piece, documents, parse_spec
from dbcore.errors import SourceError
from dbcore.models.tokenizer import CHAR_SEPARATOR, CharTokenizer, Tokenizer, load_file, train_bpe
from dbcore.models.tokenizer import parse_spec as parse_tokenizer
from dbcore.models.vocab import Vocabulary, code_points, code_points_to_str, line_col, unknown_char

# Text encoded per call, about: the library's encodings hold ~60 bytes per token, so 8 MiB batches
# peaked at 640 MiB and 1 MiB ones at 105 MiB (benches/bench_tokenize.py), at the same speed.
ENCODE_BATCH_BYTES = 1 << 20
_NUM_CODE_POINTS = 0x110000


def token_dtype(size: int) -> np.dtype:
    """The stored dtype of the ids of a vocabulary of `size` tokens."""
    return np.dtype(np.uint16 if size <= 1 << 16 else np.uint32)


@dataclass(frozen=True, eq=False)
class TextSource:
    """A corpus as token ids; `tokens` lives in a temporary file removed by close() or GC."""

    spec: str
    sha256: str  # of the documents' UTF-8 bytes, a NUL byte between documents
    num_bytes: int  # UTF-8 bytes of the documents (separators not counted)
    num_documents: int
    tokenizer: Tokenizer
    tokens: np.ndarray = field(repr=False)  # (num_tokens,) read-only memmap, uint16 or uint32
    _tmp: Path | None = field(default=None, repr=False)
    _finalizer: weakref.finalize | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self._tmp is not None:
            object.__setattr__(self, "_finalizer", weakref.finalize(self, _remove, self._tmp))

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def windows(self, seq_len: int, stride: int | None = None) -> np.ndarray:
        """(rows, seq_len) view: row r = tokens[r*stride : r*stride + seq_len] (default stride
        seq_len: non-overlapping); a tail shorter than a window is left out."""
        stride = seq_len if stride is None else stride
        if seq_len < 1 or stride < 1:
            raise ValueError(f"seq_len and stride must be >= 1, found seq_len={seq_len} stride={stride}")
        if seq_len > self.num_tokens:
            raise SourceError(f"{self.spec}: text has {self.num_tokens} tokens, fewer than seq_len {seq_len}")
        return np.lib.stride_tricks.sliding_window_view(self.tokens, seq_len)[::stride]

    def close(self) -> None:
        """Remove the temporary token file (an open mapping stays readable on POSIX)."""
        if self._finalizer is not None:
            self._finalizer()


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def load_text(spec_or_path: str | Path, tokenizer: Tokenizer | str = "char") -> TextSource:
    """Tokenize the corpus of a source spec (or a bare path: `text:PATH`): through `tokenizer` as
    given (a run's), or one built from the corpus by its spec (`char`, `bpe:N`, `file:PATH`)."""
    doc_spec = parse_spec(str(spec_or_path))
    if isinstance(tokenizer, str):
        tokenizer = _build(doc_spec, tokenizer)
    dtype = token_dtype(len(tokenizer))
    fd, name = tempfile.mkstemp(prefix="dbcore-text-", suffix=".tokens")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest, num_bytes, num_docs = _encode(tokenizer, documents(doc_spec), out, dtype)
        if tmp.stat().st_size == 0:
            raise SourceError(f"{doc_spec}: the corpus holds no text")
        tokens = np.memmap(tmp, dtype=dtype, mode="r")
    except BaseException:
        _remove(tmp)
        raise
    return TextSource(spec=str(doc_spec), sha256=digest, num_bytes=num_bytes, num_documents=num_docs,
                      tokenizer=tokenizer, tokens=tokens, _tmp=tmp)


def _build(doc_spec: DocumentSpec, spec: str) -> Tokenizer:
    """Pass 1: the tokenizer of `spec` for this corpus."""
    try:
        kind, arg = parse_tokenizer(spec)
    except ValueError as exc:
        raise SourceError(str(exc)) from None
    if kind == "file":
        return load_file(str(arg))
    if kind == "bpe":
        return train_bpe((p.text for p in documents(doc_spec)), int(arg))
    present = np.zeros(_NUM_CODE_POINTS, dtype=bool)
    docs = 0
    for piece in documents(doc_spec):
        present[code_points(piece.text)] = True
        docs += piece.last
    if docs > 1:  # documents are joined by the separator
        present[code_points(CHAR_SEPARATOR)] = True
    if not present.any():
        raise SourceError(f"{doc_spec}: the corpus holds no text")
    return CharTokenizer(Vocabulary(code_points_to_str(np.flatnonzero(present))))


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer: Tokenizer, pieces: Iterable[Piece], out: BinaryIO, dtype: np.dtype
            ) -> tuple[str, int, int]:
    """Pass 2: append the ids of every piece to `out`, the separator between documents; return the
    corpus digest, its UTF-8 bytes and its documents."""
    hasher = hashlib.sha256()
    num_bytes = docs = 0
    starts = True  # the next piece starts a document
    for batch in _batches(pieces):
        for piece, ids in zip(batch, _ids(tokenizer, batch), strict=True):
            if starts and docs:  # (a one-document corpus needs no separator in its vocabulary)
                out.write(tokenizer.separator().astype(dtype).tobytes())
                hasher.update(b"\0")
            raw = piece.text.encode()
            hasher.update(raw)
            num_bytes += len(raw)
            out.write(ids.astype(dtype).tobytes())
            docs += piece.last
            starts = piece.last
    return hasher.hexdigest(), num_bytes, docs


def _ids(tokenizer: Tokenizer, batch: list[Piece]) -> list[np.ndarray]:
    """The ids of each piece; for `char`, a character outside the vocabulary names its place."""
    if not isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode_batch([p.text for p in batch])
    ids = []
    for p in batch:
        row, bad = tokenizer.vocab._ids(p.text)
        if bad >= 0:
            line, column = line_col(p.text, bad, max(p.line, 1), p.column)
            raise unknown_char(p.where, p.text[bad], line, column, len(tokenizer))
        ids.append(row)
    return ids
