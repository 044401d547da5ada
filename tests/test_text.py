import gc
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import dbcore.data.text as text_mod
from dbcore.data import documents
from dbcore.data.text import TextSource, load_text
from dbcore.errors import SourceError
from dbcore.models.tokenizer import char_tokenizer
from dbcore.models.vocab import Vocabulary

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/datasets/shakespeare"
SAMPLE = "To be, or not to be: that is the question.\nWhether 'tis nobler — in the mind — to suffer\n"


def write(tmp_path: Path, content: str | bytes, name: str = "t.txt") -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


def test_vocabulary_sorted_unique_and_round_trip(tmp_path):
    src = load_text(write(tmp_path, SAMPLE))
    vocab = src.tokenizer.vocab
    assert vocab.chars == "".join(sorted(set(SAMPLE))) and len(vocab) == len(set(SAMPLE))
    ids = vocab.encode(SAMPLE)
    assert ids.dtype == np.int64 and ids.shape == (len(SAMPLE),)
    assert vocab.decode(ids) == SAMPLE and vocab.decode(list(ids)) == SAMPLE and vocab.decode([]) == ""
    assert np.array_equal(src.tokens, ids) and src.num_tokens == len(SAMPLE)
    assert src.num_bytes == len(SAMPLE.encode()) and src.num_documents == 1
    path = tmp_path / "t.txt"
    assert src.spec == f"text:{path}" and load_text(f"text:{path}").spec == f"text:{path}"
    with pytest.raises(ValueError, match="outside 0"):
        vocab.decode([0, len(vocab)])
    with pytest.raises(ValueError, match="outside 0"):
        vocab.decode(np.array([-1]))


def test_tokens_are_a_read_only_uint16_memmap_removed_on_close_and_gc(tmp_path):
    src = load_text(write(tmp_path, SAMPLE))
    assert src.tokens.dtype == np.uint16 and isinstance(src.tokens, np.memmap)
    assert not src.tokens.flags.writeable
    tmp = Path(src.tokens.filename)
    assert tmp.exists()
    src.close()
    assert not tmp.exists()
    src.close()  # idempotent
    tmp = Path(load_text(write(tmp_path, SAMPLE)).tokens.filename)
    gc.collect()
    assert not tmp.exists()


def test_token_dtype_is_uint16_until_the_vocabulary_outgrows_it():
    assert text_mod.token_dtype(65) == np.uint16
    assert text_mod.token_dtype(1 << 16) == np.uint16
    assert text_mod.token_dtype((1 << 16) + 1) == np.uint32


@pytest.mark.parametrize("seq_len, stride", [(5, 1), (5, 5), (5, 3), (7, None), (len(SAMPLE), 2), (1, 1)])
def test_windows_equal_slices_of_the_encoded_string(tmp_path, seq_len, stride):
    src = load_text(write(tmp_path, SAMPLE))
    w = src.windows(seq_len, stride)
    step = seq_len if stride is None else stride
    n = (len(SAMPLE) - seq_len) // step + 1
    assert w.shape == (n, seq_len)
    for r in range(n):
        assert np.array_equal(w[r], src.tokenizer.encode(SAMPLE[r * step:r * step + seq_len]))


def test_windows_with_a_tail_drop_it(tmp_path):
    src = load_text(write(tmp_path, "abcdefghij"))  # 10 chars
    w = src.windows(4, 3)  # rows at 0, 3, 6; "j" is left over
    assert w.shape == (3, 4)
    assert src.tokenizer.decode(w.ravel()) == "abcd" + "defg" + "ghij"
    w = src.windows(3)  # rows at 0, 3, 6; "j" is left over
    assert w.shape == (3, 3) and src.tokenizer.decode(w.ravel()) == "abcdefghi"


def test_windows_bad_arguments(tmp_path):
    src = load_text(write(tmp_path, "abcdef"))
    for seq_len, stride in [(0, None), (-1, 1), (3, 0), (3, -2)]:
        with pytest.raises(ValueError, match=">= 1"):
            src.windows(seq_len, stride)
    with pytest.raises(SourceError, match="text has 6 tokens, fewer than seq_len 7"):
        src.windows(7)
    assert src.windows(6).shape == (1, 6)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_multibyte_chars_split_over_chunks(tmp_path, monkeypatch, chunk):
    content = "ab€cd😀e\néß\nf" * 5  # 1-, 2-, 3- and 4-byte characters
    p = write(tmp_path, content)
    whole = load_text(p)
    monkeypatch.setattr(documents, "PIECE_BYTES", chunk)
    split = load_text(p)
    assert split.tokenizer.vocab == whole.tokenizer.vocab and split.sha256 == whole.sha256
    assert split.num_tokens == len(content) and np.array_equal(split.tokens, whole.tokens)
    assert np.array_equal(split.tokens, whole.tokenizer.encode(content))


def test_sha256_of_one_file_is_of_its_bytes(tmp_path):
    p = write(tmp_path, SAMPLE)
    assert load_text(p).sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_given_tokenizer_maps_the_text_through_it(tmp_path):
    tok = char_tokenizer("".join(sorted(set("abcdefgh \n"))))
    src = load_text(write(tmp_path, "bad cafe\nfade"), tok)
    assert src.tokenizer is tok and np.array_equal(src.tokens, tok.encode("bad cafe\nfade"))


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_unknown_char_names_line_column_and_file(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(documents, "PIECE_BYTES", chunk)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    tok = char_tokenizer("".join(sorted(set("abc \n"))))
    p = write(tmp_path, "abc\nab cab\nca é b\n")
    with pytest.raises(SourceError, match=r"t\.txt: line 3, column 4: character 'é'"):
        load_text(p, tok)
    with pytest.raises(SourceError, match=r"^here: line 2, column 3: character 'z'"):
        tok.encode("ab\nabz", where="here")
    with pytest.raises(SourceError, match=r"line 1, column 14: character 'x'"):
        load_text(write(tmp_path, "abcabcabcabcax"), tok)  # no newline: a piece cut mid-line
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
    monkeypatch.setattr(documents, "PIECE_BYTES", chunk)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    p = write(tmp_path, content)
    with pytest.raises(SourceError, match=message):
        load_text(p)
    assert not list(scratch.iterdir())  # no token file left behind


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SourceError, match="matches no file"):
        load_text(f"text:{tmp_path / 'nope.txt'}")
    with pytest.raises(SourceError, match="matches no file"):
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
    assert src.num_tokens == len(text) and src.tokenizer.vocab.chars == "".join(sorted(set(text)))
    ev = load_text(valid, src.tokenizer)  # must not raise: valid.txt uses only train.txt's characters
    assert ev.tokenizer.decode(ev.tokens) == valid.read_text(encoding="utf-8")
    assert isinstance(ev, TextSource) and ev.tokens.dtype == np.uint16
    print(f"train.txt: {src.num_tokens} chars, vocab {len(src.tokenizer)}, loaded in {seconds:.2f}s")
