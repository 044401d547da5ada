"""A character vocabulary: token id i <-> the i-th character by code point. A text model's frozen
`vocab` array (its code points) is this vocabulary; text sources encode through it, and a model's
samples decode through it. A character outside it is a SourceError naming where it was found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dbcore.errors import SourceError


def code_points(text: str) -> np.ndarray:
    """(len(text),) uint32 code points of `text`, without a Python loop."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def code_points_to_str(codes: np.ndarray) -> str:
    return codes.astype("<u4").tobytes().decode("utf-32-le")


def line_col(text: str, i: int, line: int = 1, col: int = 0) -> tuple[int, int]:
    """1-based line and column of text[i], given the line of text[0] and the columns before it."""
    nl = text.rfind("\n", 0, i)
    if nl < 0:
        return line, col + i + 1
    return line + text.count("\n", 0, i), i - nl


def unknown_char(where: str, ch: str, line: int, col: int, size: int) -> SourceError:
    return SourceError(f"{where}: line {line}, column {col}: character {ch!r} (U+{ord(ch):04X}) "
                       f"is not in the vocabulary of {size} characters")


@dataclass(frozen=True)
class Vocabulary:
    """The characters of a text, sorted by code point and unique; id i <-> chars[i]."""

    chars: str
    _codes: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.chars, str) or not self.chars:
            raise SourceError(f"vocabulary must be a non-empty str, found {self.chars!r}")
        codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        if ((codes >= 0xD800) & (codes <= 0xDFFF)).any():
            raise SourceError("vocabulary holds a surrogate code point, which UTF-8 text cannot contain")
        steps = np.diff(codes.astype(np.int64))
        if (steps <= 0).any():
            i = int(np.argmax(steps <= 0))
            a, b = self.chars[i], self.chars[i + 1]
            what = "a duplicate character" if a == b else "characters out of order"
            raise SourceError(f"vocabulary must be sorted and unique: {what} {a!r}, {b!r} at {i}, {i + 1}")
        codes.flags.writeable = False
        object.__setattr__(self, "_codes", codes)

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        """The vocabulary of the characters in `text`."""
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def _ids(self, text: str) -> tuple[np.ndarray, int]:
        """Ids of `text` (int64) and the index of its first character outside the vocabulary, or -1."""
        cps = code_points(text)
        ids = np.searchsorted(self._codes, cps)
        np.minimum(ids, len(self._codes) - 1, out=ids)
        bad = self._codes[ids] != cps
        return ids, int(np.argmax(bad)) if bad.any() else -1

    def encode(self, text: str, where: str = "text") -> np.ndarray:
        """(len(text),) int64 ids; a character outside the vocabulary is a SourceError naming `where`."""
        ids, bad = self._ids(text)
        if bad >= 0:
            raise unknown_char(where, text[bad], *line_col(text, bad), len(self))
        return ids.astype(np.int64, copy=False)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids`; an id outside 0..len-1 is a ValueError."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return ""
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, found dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= len(self):
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside 0..{len(self) - 1}")
        return self._codes[arr.ravel()].tobytes().decode("utf-32-le")

    def to_json(self) -> list[str]:
        """The characters as a JSON list, for store attributes."""
        return list(self.chars)

    @classmethod
    def from_json(cls, items: Sequence[str]) -> Vocabulary:
        """The vocabulary of a `to_json` list, validated: single characters, sorted, unique."""
        if not isinstance(items, (list, tuple)):
            raise SourceError(f"vocabulary must be a list of characters, found {type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, str) or len(item) != 1:
                raise SourceError(f"vocabulary item {i} must be a single character, found {item!r}")
        return cls("".join(items))
