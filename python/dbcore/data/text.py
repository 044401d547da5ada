"""Character-level text source for language-model recipes: `text:PATH` (or a bare path).

The file is UTF-8 text, read in chunks of TEXT_READ_BYTES and never held whole as a Python str.
Pass 1 hashes the bytes, counts the characters (code points) and, unless a vocabulary is given,
collects the character set; pass 2 maps each chunk to token ids (id i <-> vocab.chars[i], the
characters sorted by code point) and writes them to a read-only memmap in a temporary file.
`TextSource.windows(seq_len, stride)` serves rows `tokens[r*stride : r*stride + seq_len]` as int32.
Empty files, binary files (a NUL byte or invalid UTF-8) and characters outside a given vocabulary
are SourceErrors that name the file and the offset, or the line and column.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dbcore.errors import SourceError
from dbcore.models.vocab import Vocabulary, code_points, code_points_to_str, line_col, unknown_char

TEXT_READ_BYTES = 1 << 20  # bytes per read when streaming
_NUM_CODE_POINTS = 0x110000


class Windows:
    """Rows of a token sequence to cache: row r = tokens[r*stride : r*stride + seq_len], as int32."""

    dtype = np.dtype(np.int32)

    def __init__(self, source: TextSource, seq_len: int, stride: int) -> None:
        self.source = source  # keeps the token file alive
        self.seq_len, self.stride = seq_len, stride
        self._view = np.lib.stride_tricks.sliding_window_view(source.tokens, seq_len)[::stride]
        self.shape = (len(self._view), seq_len)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError(f"Windows rows must be a slice, found {type(rows).__name__}")
        return np.array(self._view[rows], dtype=np.int32, order="C")

    def __repr__(self) -> str:
        return f"Windows({self.source.spec!r}, shape={self.shape}, stride={self.stride})"


@dataclass(frozen=True, eq=False)
class TextSource:
    """A UTF-8 text file as token ids; `tokens` lives in a temporary file removed by close() or GC."""

    spec: str
    path: Path
    sha256: str
    num_chars: int
    vocab: Vocabulary
    tokens: np.ndarray = field(repr=False)  # (num_chars,) read-only memmap, uint8/16/32
    _tmp: Path | None = field(default=None, repr=False)
    _finalizer: weakref.finalize | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self._tmp is not None:
            object.__setattr__(self, "_finalizer", weakref.finalize(self, _remove, self._tmp))

    def windows(self, seq_len: int, stride: int | None = None) -> Windows:
        """Windows of seq_len tokens every `stride` tokens (default seq_len: non-overlapping)."""
        stride = seq_len if stride is None else stride
        if seq_len < 1 or stride < 1:
            raise ValueError(f"seq_len and stride must be >= 1, found seq_len={seq_len} stride={stride}")
        if seq_len > self.num_chars:
            raise SourceError(f"{self.path}: text has {self.num_chars} characters, "
                              f"fewer than seq_len {seq_len}")
        return Windows(self, seq_len, stride)

    def close(self) -> None:
        """Remove the temporary token file (an open mapping stays readable on POSIX)."""
        if self._finalizer is not None:
            self._finalizer()


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _chunks(path: Path, on_bytes: Callable[[bytes], object] | None = None) -> Iterator[str]:
    """Decoded chunks of the file; a NUL byte or invalid UTF-8 (whichever is first) is a SourceError."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    pos = 0
    try:
        with open(path, "rb") as f:
            while raw := f.read(TEXT_READ_BYTES):
                if on_bytes is not None:
                    on_bytes(raw)
                yield _decode(path, decoder, raw, pos, final=False)
                pos += len(raw)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    yield _decode(path, decoder, b"", pos, final=True)


def _decode(path: Path, decoder: codecs.IncrementalDecoder, raw: bytes, pos: int, final: bool) -> str:
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


def _token_dtype(size: int) -> np.dtype:
    return np.dtype(np.uint8 if size <= 1 << 8 else np.uint16 if size <= 1 << 16 else np.uint32)


def load_text(spec_or_path: str | Path, vocab: Vocabulary | None = None) -> TextSource:
    """Load `text:PATH` or a bare path; with `vocab`, map the text through it instead of its own."""
    if isinstance(spec_or_path, str) and spec_or_path.startswith("text:"):
        spec, path = spec_or_path, Path(spec_or_path[len("text:"):])
    else:
        spec, path = f"text:{spec_or_path}", Path(spec_or_path)
    if spec == "text:":
        raise SourceError(f"text source {spec!r} names no file: expected 'text:PATH'")
    if not path.exists():
        raise SourceError(f"text source not found: {path}")
    if path.is_dir():
        raise SourceError(f"{path}: is a directory, expected a UTF-8 text file")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: text file is empty")

    # Pass 1: hash, count and (without a vocabulary) collect the characters.
    hasher = hashlib.sha256()
    num_chars = 0
    present = np.zeros(_NUM_CODE_POINTS, dtype=bool) if vocab is None else None
    for text in _chunks(path, hasher.update):
        num_chars += len(text)
        if present is not None:
            present[code_points(text)] = True
    if present is not None:
        vocab = Vocabulary(code_points_to_str(np.flatnonzero(present)))

    # Pass 2: write the ids to a temporary memmap, chunk by chunk.
    fd, name = tempfile.mkstemp(prefix="dbcore-text-", suffix=".tokens")
    os.close(fd)
    tmp = Path(name)
    try:
        dtype = _token_dtype(len(vocab))
        out = np.memmap(tmp, dtype=dtype, mode="w+", shape=(num_chars,))
        at, line, col = 0, 1, 0
        for text in _chunks(path):
            ids, bad = vocab._ids(text)
            if bad >= 0:
                raise unknown_char(str(path), text[bad], *line_col(text, bad, line, col), len(vocab))
            if at + len(ids) > num_chars:
                raise SourceError(f"{path}: file changed while reading")
            out[at:at + len(ids)] = ids
            at += len(ids)
            nl = text.rfind("\n")
            col = col + len(text) if nl < 0 else len(text) - nl - 1  # columns before the next chunk
            line += text.count("\n")
        if at != num_chars:
            raise SourceError(f"{path}: file changed while reading")
        out.flush()
        del out
        tokens = np.memmap(tmp, dtype=dtype, mode="r", shape=(num_chars,))
    except BaseException:
        _remove(tmp)
        raise
    return TextSource(spec=spec, path=path, sha256=hasher.hexdigest(), num_chars=num_chars,
                      vocab=vocab, tokens=tokens, _tmp=tmp)
