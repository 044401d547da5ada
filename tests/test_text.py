import gc
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import dbcore.data.text as text_mod
from dbcore.data.text import TextSource, Windows, load_text
from dbcore.errors import SourceError
from dbcore.models.vocab import Vocabulary

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/datasets/shakespeare"
SAMPLE = "To be, or not to be: that is the question.\nWhether 'tis nobler — in the mind — to suffer\n"


def write(tmp_path: Path, content: str | bytes, name: str = "t.txt") -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


def test_vocabulary_sorted_unique_and_round_trip(tmp_path):
    src = load_text(write(tmp_path, SAMPLE))
    chars = src.vocab.chars
    assert chars == "".join(sorted(set(SAMPLE))) and len(src.vocab) == len(set(SAMPLE))
    assert [ord(c) for c in chars] == sorted({ord(c) for c in chars})
    ids = src.vocab.encode(SAMPLE)
    assert ids.dtype == np.int64 and ids.shape == (len(SAMPLE),)
    assert src.vocab.decode(ids) == SAMPLE and src.vocab.decode(list(ids)) == SAMPLE
    assert src.vocab.decode([]) == ""
    assert np.array_equal(src.tokens, ids) and src.num_chars == len(SAMPLE)
    assert Vocabulary.from_json(src.vocab.to_json()) == src.vocab
    assert src.spec == f"text:{src.path}" and load_text(f"text:{src.path}").spec == f"text:{src.path}"
    with pytest.raises(ValueError, match="outside 0"):
        src.vocab.decode([0, len(src.vocab)])
    with pytest.raises(ValueError, match="outside 0"):
        src.vocab.decode(np.array([-1]))


def test_tokens_are_a_read_only_uint8_memmap_removed_on_close_and_gc(tmp_path):
    src = load_text(write(tmp_path, SAMPLE))
    assert src.tokens.dtype == np.uint8 and isinstance(src.tokens, np.memmap)
    assert not src.tokens.flags.writeable
    tmp = Path(src.tokens.filename)
    assert tmp.exists()
    src.close()
    assert not tmp.exists()
    src.close()  # idempotent
    tmp = Path(load_text(write(tmp_path, SAMPLE)).tokens.filename)
    gc.collect()
    assert not tmp.exists()


def test_token_dtype_grows_with_the_vocabulary():
    assert text_mod._token_dtype(256) == np.uint8
    assert text_mod._token_dtype(257) == np.uint16
    assert text_mod._token_dtype(1 << 17) == np.uint32


def test_wide_vocabulary_uses_uint16(tmp_path):
    content = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 300)) + "\n"
    src = load_text(write(tmp_path, content))
    assert len(src.vocab) == 301 and src.tokens.dtype == np.uint16
    assert src.vocab.decode(src.tokens) == content


@pytest.mark.parametrize("seq_len, stride", [(5, 1), (5, 5), (5, 3), (7, None), (len(SAMPLE), 2), (1, 1)])
def test_windows_equal_slices_of_the_encoded_string(tmp_path, seq_len, stride):
    src = load_text(write(tmp_path, SAMPLE))
    w = src.windows(seq_len, stride)
    step = seq_len if stride is None else stride
    n = (len(SAMPLE) - seq_len) // step + 1
    assert isinstance(w, Windows) and len(w) == n and w.shape == (n, seq_len) and w.dtype == np.int32
    rows = w[0:n]
    assert rows.dtype == np.int32 and rows.flags.c_contiguous and rows.shape == (n, seq_len)
    for r in range(n):
        expect = src.vocab.encode(SAMPLE[r * step:r * step + seq_len])
        assert np.array_equal(rows[r], expect)
    assert np.array_equal(w[1:3], rows[1:3]) and np.array_equal(w[:], rows)
    assert w[n:n + 5].shape == (0, seq_len)


def test_windows_with_a_tail_drop_it(tmp_path):
    src = load_text(write(tmp_path, "abcdefghij"))  # 10 chars
    w = src.windows(4, 3)  # rows at 0, 3, 6; "j" is left over
    assert w.shape == (3, 4)
    assert src.vocab.decode(w[:].ravel()) == "abcd" + "defg" + "ghij"
    w = src.windows(3)  # rows at 0, 3, 6; "j" is left over
    assert w.shape == (3, 3) and src.vocab.decode(w[:].ravel()) == "abcdefghi"


def test_windows_bad_arguments(tmp_path):
    src = load_text(write(tmp_path, "abcdef"))
    for seq_len, stride in [(0, None), (-1, 1), (3, 0), (3, -2)]:
        with pytest.raises(ValueError, match=">= 1"):
            src.windows(seq_len, stride)
    with pytest.raises(SourceError, match="text has 6 characters, fewer than seq_len 7"):
        src.windows(7)
    assert src.windows(6).shape == (1, 6)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_multibyte_chars_split_over_chunks(tmp_path, monkeypatch, chunk):
    content = "ab€cd😀e\néß\nf" * 5  # 1-, 2-, 3- and 4-byte characters
    p = write(tmp_path, content)
    whole = load_text(p)
    monkeypatch.setattr(text_mod, "TEXT_READ_BYTES", chunk)
    split = load_text(p)
    assert split.vocab == whole.vocab and split.sha256 == whole.sha256 and split.num_chars == len(content)
    assert np.array_equal(split.tokens, whole.tokens)
    assert np.array_equal(split.tokens, whole.vocab.encode(content))


def test_sha256_is_of_the_file_bytes(tmp_path):
    p = write(tmp_path, SAMPLE)
    assert load_text(p).sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_given_vocabulary_maps_the_text_through_it(tmp_path):
    vocab = Vocabulary.from_text("abcdefgh \n")
    src = load_text(write(tmp_path, "bad cafe\nfade"), vocab)
    assert src.vocab is vocab and np.array_equal(src.tokens, vocab.encode("bad cafe\nfade"))


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_unknown_char_names_line_column_and_file(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(text_mod, "TEXT_READ_BYTES", chunk)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    vocab = Vocabulary.from_text("abc \n")
    p = write(tmp_path, "abc\nab cab\nca é b\n")
    with pytest.raises(SourceError, match=r"t\.txt: line 3, column 4: character 'é'"):
        load_text(p, vocab)
    with pytest.raises(SourceError, match=r"^here: line 2, column 3: character 'z'"):
        vocab.encode("ab\nabz", where="here")
    with pytest.raises(SourceError, match=r"line 1, column 1: character 'x'"):
        load_text(write(tmp_path, "xab"), vocab)
    assert not list(scratch.iterdir())  # the half-written token file is removed


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"ab\x00cd", "looks binary: NUL byte at offset 2"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "invalid start byte"),  # the first problem is named
        (b"abc\xff\xfedef", "not UTF-8 text: byte 0xff at offset 3"),
        ("abc€".encode()[:-1], "offset 3 .*unexpected end of data"),  # truncated at the end
        (b"ab\xe2\x00", "offset 2 .*invalid continuation byte"),
    ],
)
@pytest.mark.parametrize("chunk", [2, 1 << 20])
def test_bad_files_name_the_problem(tmp_path, monkeypatch, content, message, chunk):
    monkeypatch.setattr(text_mod, "TEXT_READ_BYTES", chunk)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    p = write(tmp_path, content)
    with pytest.raises(SourceError, match=message):
        load_text(p)
    assert not list(scratch.iterdir())  # no token file left behind


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        load_text(f"text:{tmp_path / 'nope.txt'}")
    with pytest.raises(SourceError, match="not found"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(SourceError, match="is a directory"):
        load_text(tmp_path)
    with pytest.raises(SourceError, match="names no file"):
        load_text("text:")


@pytest.mark.parametrize(
    "items, message",
    [
        (["a", "b", "b"], "duplicate character 'b'"),
        (["b", "a"], "out of order"),
        (["a", "bc"], "item 1 must be a single character"),
        (["a", 3], "item 1 must be a single character"),
        ([], "non-empty"),
        ("abc", "must be a list"),
        (["\ud800"], "surrogate"),
    ],
)
def test_vocabulary_from_json_validates(items, message):
    with pytest.raises(SourceError, match=message):
        Vocabulary.from_json(items)


def test_vocabulary_json_round_trip():
    v = Vocabulary.from_json(["\n", " ", "A", "a", "é", "😀"])
    assert v.chars == "\n Aaé😀" and v.to_json() == ["\n", " ", "A", "a", "é", "😀"]
    assert Vocabulary.from_json(v.to_json()) == v


@pytest.mark.slow
def test_shakespeare_valid_encodes_with_the_train_vocabulary():
    train, valid = SHAKESPEARE / "train.txt", SHAKESPEARE / "valid.txt"
    if not (train.is_file() and valid.is_file()):
        pytest.skip(f"no Shakespeare corpus at {SHAKESPEARE}")
    t0 = time.perf_counter()
    src = load_text(train)
    seconds = time.perf_counter() - t0
    text = train.read_text(encoding="utf-8")
    assert src.num_chars == len(text) and src.vocab.chars == "".join(sorted(set(text)))
    ev = load_text(valid, src.vocab)  # must not raise: valid.txt uses only train.txt's characters
    assert ev.num_chars == len(valid.read_text(encoding="utf-8"))
    assert ev.vocab.decode(ev.tokens) == valid.read_text(encoding="utf-8")
    assert isinstance(ev, TextSource) and ev.tokens.dtype == np.uint8
    print(f"train.txt: {src.num_chars} chars, vocab {len(src.vocab)}, loaded in {seconds:.2f}s")
