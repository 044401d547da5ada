"""Tokenizers of the language models, `[model] tokenizer`:

- `char`: one token per character (`dbcore.models.vocab.Vocabulary`), the characters of the
  training text; documents are joined by `CHAR_SEPARATOR`.
- `bpe:N`: byte-level BPE of N tokens (Hugging Face `tokenizers`), trained on the training source;
  its special token `EOT` (id 0) ends each document.
- `file:PATH`: a user's `tokenizer.json` (e.g. GPT-2's); documents end with its end-of-text token
  (the first of `EOT_NAMES` it has), or with `CHAR_SEPARATOR` where it has none.

Every tokenizer is saved as JSON bytes (`to_bytes`), the store's frozen `tokenizer` array, so it
travels with the store and every checkpoint of the run (`from_bytes`). Each has `len`, `encode`,
`encode_batch`, `decode`, `num_bytes` (of the text of some ids), `separator` (the ids put between
documents) and `spec`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from dbcore.errors import SourceError
from dbcore.models.vocab import Vocabulary

CHAR_SEPARATOR = "\n\n"  # between documents, for tokenizers without an end-of-text token
EOT = "<|endoftext|>"  # the end-of-text token of `bpe:N`
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "[SEP]")  # looked for in a user's tokenizer
BPE_MIN_SIZE = 257  # 256 byte tokens and EOT
KINDS = ("char", "bpe:N", "file:PATH")


class Tokenizer(Protocol):
    spec: str

    def __len__(self) -> int: ...
    def encode(self, text: str, where: str = "text") -> np.ndarray: ...
    def encode_batch(self, texts: Sequence[str], where: str = "text") -> list[np.ndarray]: ...
    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...
    def num_bytes(self, ids: Sequence[int] | np.ndarray) -> int: ...
    def separator(self) -> np.ndarray: ...
    def to_bytes(self) -> bytes: ...


def parse_spec(spec: str) -> tuple[str, int | str | None]:
    """("char", None), ("bpe", N) or ("file", PATH) of a `[model] tokenizer` value; else ValueError."""
    kind, _, arg = spec.partition(":")
    if spec == "char":
        return "char", None
    if kind == "bpe" and arg.isdigit() and int(arg) >= BPE_MIN_SIZE:
        return "bpe", int(arg)
    if kind == "file" and arg:
        return "file", arg
    raise ValueError(f"tokenizer {spec!r}: expected one of {', '.join(KINDS)} (N >= {BPE_MIN_SIZE})")


class CharTokenizer:
    """`char`: token id i <-> the i-th character of the vocabulary."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab, self.spec = vocab, "char"

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, where: str = "text") -> np.ndarray:
        return self.vocab.encode(text, where)

    def encode_batch(self, texts: Sequence[str], where: str = "text") -> list[np.ndarray]:
        return [self.vocab.encode(t, where) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.vocab.decode(ids)

    def num_bytes(self, ids: Sequence[int] | np.ndarray) -> int:
        """UTF-8 bytes of the text of `ids`."""
        return len(self.decode(ids).encode())

    def separator(self) -> np.ndarray:
        return self.vocab.encode(CHAR_SEPARATOR, "the document separator")

    def to_bytes(self) -> bytes:
        return json.dumps({"kind": "char", "chars": self.vocab.chars}).encode()


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (`bpe:N` or `file:PATH`)."""

    def __init__(self, tok: Any, spec: str) -> None:
        self.tok, self.spec = tok, spec
        self.eot = next((i for name in EOT_NAMES if (i := tok.token_to_id(name)) is not None), None)

    def __len__(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, where: str = "text") -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str], where: str = "text") -> list[np.ndarray]:
        """Ids of each text, encoded in parallel by the library's threads (off the GIL)."""
        out = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in out]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids).ravel()
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= len(self)):
            raise ValueError(f"token id outside 0..{len(self) - 1}")
        return self.tok.decode(arr.tolist(), skip_special_tokens=False)

    def num_bytes(self, ids: Sequence[int] | np.ndarray) -> int:
        """UTF-8 bytes of the text of `ids`, special tokens (the end of a document) not counted."""
        return len(self.tok.decode(np.asarray(ids).ravel().tolist(), skip_special_tokens=True).encode())

    def separator(self) -> np.ndarray:
        if self.eot is not None:
            return np.array([self.eot], dtype=np.int64)
        return self.encode(CHAR_SEPARATOR)

    def to_bytes(self) -> bytes:
        return json.dumps({"kind": self.spec.partition(":")[0], "spec": self.spec,
                           "tokenizer": self.tok.to_str()}).encode()


def from_bytes(data: bytes | np.ndarray, where: str = "tokenizer") -> Tokenizer:
    """The tokenizer saved by `to_bytes` (a store's or checkpoint's `tokenizer` array)."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    try:
        saved = json.loads(raw)
        if saved["kind"] == "char":
            return CharTokenizer(Vocabulary(saved["chars"]))
        from tokenizers import Tokenizer as HF

        return HFTokenizer(HF.from_str(saved["tokenizer"]), saved["spec"])
    except Exception as exc:  # json, a missing key, or the library (which raises plain Exception)
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"{where}: not a saved dbcore tokenizer ({exc})") from None


def load_file(path: str) -> HFTokenizer:
    """`file:PATH`: a `tokenizer.json` that Hugging Face `tokenizers` loads."""
    from tokenizers import Tokenizer as HF

    try:
        return HFTokenizer(HF.from_file(path), f"file:{path}")
    except Exception as exc:  # the library raises plain Exception for a missing or bad file
        raise SourceError(f"{path}: not a tokenizer that Hugging Face tokenizers loads ({exc})") from None


def train_bpe(pieces: Iterable[str], size: int) -> HFTokenizer:
    """`bpe:N`: byte-level BPE of `size` tokens (id 0 is EOT) trained on `pieces` of text, streamed:
    memory grows with the distinct words, not with the text."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_nonempty(pieces), trainer=trainer)
    return HFTokenizer(tok, f"bpe:{size}")


def _nonempty(pieces: Iterable[str]) -> Iterator[str]:
    return (p for p in pieces if p)


def char_tokenizer(chars: str) -> CharTokenizer:
    return CharTokenizer(Vocabulary(chars))


__all__ = ["CHAR_SEPARATOR", "EOT", "CharTokenizer", "HFTokenizer", "Tokenizer", "char_tokenizer",
           "from_bytes", "load_file", "parse_spec", "train_bpe"]
