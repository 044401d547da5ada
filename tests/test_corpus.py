"""Text corpora as users keep them (text files, JSONL, Parquet), the tokenizers (char, bpe:N,
file:PATH), the flat token store and the windows the stream cuts from it at read time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dbcore import api
from dbcore.cli import main
from dbcore.data import store as store_mod
from dbcore.data.stream import BatchStream
from dbcore.data.text import load_text
from dbcore.errors import SourceError
from dbcore.method import layout
from dbcore.models.lm import tokenizer_of
from dbcore.models.tokenizer import CHAR_SEPARATOR, EOT, load_file, train_bpe

DOCS = ["First doc: to be, or not to be.", "Zweites Dokument — ä ö ü ß.", "third\nwith two lines\n",
        "Ending 😀 here"]
TINY = {"recipe": "mdlm", "seq_len": 16, "stride": 8, "dim": 32, "depth": 2, "heads": 2, "num_blocks": 2,
        "sample_steps": 4}
TRAIN = {"steps": 4, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2, "threads": 1}


def _jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _parquet(path, docs, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: docs, "n": list(range(len(docs)))}), path, row_group_size=2)
    return path


def _documents(src) -> list[str]:
    """The stream split back into documents at the end-of-text token."""
    ids = np.asarray(src.tokens).astype(np.int64)
    parts = np.split(ids, np.flatnonzero(ids == src.tokenizer.eot))
    return [src.tokenizer.decode(parts[0])] + [src.tokenizer.decode(p[1:]) for p in parts[1:]]


@pytest.mark.parametrize("tokenizer", ["char", "bpe:300"])
def test_jsonl_and_parquet_documents_decode_back(tmp_path, tokenizer):
    half = len(DOCS) // 2
    _jsonl(tmp_path / "b.jsonl", DOCS[half:])
    _jsonl(tmp_path / "a.jsonl", DOCS[:half])  # files in sorted order, not in creation order
    for spec in (f"jsonl:{tmp_path}/*.jsonl",
                 f"parquet:{_parquet(tmp_path / 'c.parquet', DOCS)}"):
        src = load_text(spec, tokenizer)
        assert src.num_documents == len(DOCS) and src.num_bytes == sum(len(d.encode()) for d in DOCS)
        assert src.tokens.dtype == np.uint16
        if tokenizer == "char":  # documents joined by the separator
            assert src.tokenizer.decode(src.tokens) == CHAR_SEPARATOR.join(DOCS)
        if tokenizer != "char":
            assert len(src.tokenizer) == 300 and src.tokenizer.eot is not None
            assert _documents(src) == DOCS


def test_fields_and_columns_are_named_after_a_hash(tmp_path):
    docs = ["one", "two"]
    j = load_text(f"jsonl:{_jsonl(tmp_path / 'a.jsonl', docs, 'content')}#content")
    p = load_text(f"parquet:{_parquet(tmp_path / 'a.parquet', docs, 'body')}#body")
    for src in (j, p):
        assert src.tokenizer.decode(src.tokens).split(CHAR_SEPARATOR) == docs
    assert j.spec.endswith("#content") and p.spec.endswith("#body")


def test_text_files_of_a_glob_are_documents_in_sorted_order(tmp_path):
    (tmp_path / "2.txt").write_text("beta")
    (tmp_path / "1.txt").write_text("alpha")
    src = load_text(f"text:{tmp_path}/*.txt")
    assert src.num_documents == 2 and src.tokenizer.decode(src.tokens) == "alpha" + CHAR_SEPARATOR + "beta"


@pytest.mark.parametrize("content, field, message", [
    ('{"text": "ok"}\n{"text": oops}\n', "text", r"a\.jsonl: line 2: not JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', "text", r"a\.jsonl: line 3: no field 'text' \(found \['body'\]\)"),
    ('{"text": 3}\n', "text", r"a\.jsonl: line 1: field 'text' must be a string, found int"),
    ('["text"]\n', "text", r"a\.jsonl: line 1: expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, field, message):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(SourceError, match=message):
        load_text(f"jsonl:{tmp_path / 'a.jsonl'}")


def test_bad_parquet_and_patterns_are_one_line(tmp_path):
    p = _parquet(tmp_path / "a.parquet", ["x", "y"])
    with pytest.raises(SourceError, match=r"a\.parquet: no column 'body' \(columns: \['text', 'n'\]\)"):
        load_text(f"parquet:{p}#body")
    with pytest.raises(SourceError, match=r"column 'n' is int64, expected strings"):
        load_text(f"parquet:{p}#n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(SourceError, match=r"null\.parquet: row 1: column 'text' is null"):
        load_text(f"parquet:{tmp_path / 'null.parquet'}")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match=r"junk\.parquet: not a Parquet file"):
        load_text(f"parquet:{tmp_path / 'junk.parquet'}")
    with pytest.raises(SourceError, match="matches no file"):
        load_text(f"jsonl:{tmp_path}/*.jsonl")


def test_tokenizer_files_load_and_bad_ones_are_one_line(tmp_path):
    bpe = train_bpe(DOCS * 3, 280)
    path = tmp_path / "tokenizer.json"
    bpe.tok.save(str(path))
    src = load_text(f"jsonl:{_jsonl(tmp_path / 'a.jsonl', DOCS)}", f"file:{path}")
    assert src.tokenizer.spec == f"file:{path}" and src.tokenizer.eot == bpe.eot == 0
    assert _documents(src) == DOCS
    assert load_file(str(path)).encode("to be").tolist() == bpe.encode("to be").tolist()
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(SourceError, match="not a tokenizer that Hugging Face tokenizers loads"):
            load_text(f"jsonl:{tmp_path / 'a.jsonl'}", f"file:{bad}")
    with pytest.raises(SourceError, match="expected one of char, bpe:N, file:PATH"):
        load_text(f"jsonl:{tmp_path / 'a.jsonl'}", "bpe:12")
    with pytest.raises(ValueError, match="expected one of char"):
        api.config({"model": {**TINY, "tokenizer": "wordpiece"}, "train": TRAIN})


def test_a_vocabulary_past_uint16_is_stored_as_uint32(tmp_path):
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 20_992)) + "".join(
        chr(c) for c in range(0x20000, 0x20000 + 44_600))  # 65,592 distinct characters
    (tmp_path / "wide.txt").write_text(text)
    src = load_text(tmp_path / "wide.txt")
    assert len(src.tokenizer) > 1 << 16 and src.tokens.dtype == np.uint32
    assert src.tokenizer.decode(src.tokens) == text


def _corpus(tmp_path, n=40):
    words = ["alpha", "beta", "gamma", "delta", "to", "be", "or", "not"]
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, 30)) for _ in range(n)]
    return _jsonl(tmp_path / "corpus.jsonl", docs), docs


def test_the_store_keeps_one_stream_that_decodes_to_the_documents(tmp_path):
    path, docs = _corpus(tmp_path)
    cfg = api.config({"model": {**TINY, "tokenizer": "bpe:270"}, "train": TRAIN})
    s = store_mod.open(api.cache(cfg, f"jsonl:{path}", tmp_path / "c.zarr"))
    tokens = s.read(layout.TOKENS)
    tok = tokenizer_of({layout.TOKENIZER: torch.from_numpy(s.read(layout.TOKENIZER))})
    assert tokens.ndim == 1 and tokens.dtype == np.uint16 and tok.spec == "bpe:270"
    assert tok.decode(tokens).split(EOT) == docs
    assert s.attrs["text"]["num_documents"] == len(docs) and s.attrs["text"]["vocab_size"] == 270


def test_stream_windows_are_the_reference_offsets_and_resume(tmp_path):
    path, _ = _corpus(tmp_path)
    cfg = api.config({"model": TINY, "train": TRAIN})
    s = store_mod.open(api.cache(cfg, f"jsonl:{path}", tmp_path / "c.zarr"))
    tokens = s.read(layout.TOKENS).astype(np.int64)
    windows = (16, 5)
    stream = BatchStream(s, [layout.TOKENS], 8, seed=3, windows=windows)
    assert stream.num_samples == (len(tokens) - 16) // 5 + 1
    for epoch in range(2):
        seen = []
        for batch in stream:
            offsets = BatchStream.window_offsets(batch["index"], epoch, 3, len(tokens), windows)
            expect = np.stack([tokens[o:o + 16] for o in offsets])
            assert batch[layout.TOKENS].dtype == np.int64 and np.array_equal(batch[layout.TOKENS], expect)
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(stream.num_samples))  # a permutation of the windows
        first = BatchStream.window_offsets(np.arange(stream.num_samples), epoch, 3, len(tokens), windows)
        assert (first - np.arange(stream.num_samples) * 5 < 5).all()
    shifts = BatchStream.window_offsets(np.arange(50), 0, 3, len(tokens), windows) - np.arange(50) * 5
    assert len(set(shifts.tolist())) > 1  # the windows move within the stride
    again = BatchStream(s, [layout.TOKENS], 8, seed=3, windows=windows)
    again.load_state_dict({"epoch": 1, "position": 3})
    resumed = [b[layout.TOKENS] for b in again][0]
    stream.load_state_dict({"epoch": 1, "position": 0})
    assert np.array_equal(resumed, [b[layout.TOKENS] for b in stream][3])


def test_train_eval_sample_with_bpe_and_bits_per_byte(tmp_path):
    path, docs = _corpus(tmp_path)
    cfg = api.config({"model": {**TINY, "tokenizer": "bpe:270"}, "train": TRAIN})
    store = api.cache(cfg, f"jsonl:{path}", tmp_path / "c.zarr")
    api.train(cfg, store, tmp_path / "run")
    r = api.evaluate(tmp_path / "run", f"jsonl:{path}", num_samples=4)
    assert r["tokenizer"] == "bpe:270" and "bpc" not in r and r["bits_per_token"] > 0
    assert r["num_bytes"] > r["num_tokens"] and r["bpb"] == pytest.approx(
        r["bits_per_token"] * r["num_tokens"] / r["num_bytes"], rel=1e-6)
    tok = load_text(f"jsonl:{path}", "bpe:270").tokenizer  # the end of a document is not text
    assert tok.num_bytes([tok.eot, *tok.encode("to be")]) == 5 and tok.decode([tok.eot]) == EOT
    texts = api.sample_text(tmp_path / "run", num=2, length=40, prompt="alpha")
    assert all(t.startswith("alpha") for t in texts)
    _jsonl(tmp_path / "prompts.jsonl", ["beta gamma", "to be"])
    prompts = f"jsonl:{tmp_path}/prompts.jsonl"
    r = CliRunner().invoke(main, ["sample", str(tmp_path / "run"), "--prompts", prompts, "--num", "2",
                                  "--length", "30", "--out", str(tmp_path / "t.txt")])
    assert r.exit_code == 0 and "wrote 4 texts" in r.output, r.output
    char = api.config({"model": TINY, "train": TRAIN})
    r = CliRunner().invoke(main, ["train", _toml(tmp_path, char), "--store", str(store), "--out",
                                  str(tmp_path / "char")])
    assert r.exit_code == 1 and "other values of ['tokenizer']" in r.output and "Traceback" not in r.output


def test_a_store_of_the_old_text_layout_is_refused_in_one_line(tmp_path):
    cfg = api.config({"model": TINY, "train": TRAIN})
    s = store_mod.create(tmp_path / "old.zarr", attrs={"format": layout.FORMAT, "recipe": "mdlm"})
    s.write_array(layout.TOKENS, np.zeros((4, 16), np.int32))
    s.write_array(layout.OLD_VOCAB, np.arange(65, 70, dtype=np.int32))
    s.finalize()
    r = CliRunner().invoke(main, ["train", _toml(tmp_path, cfg), "--store", str(tmp_path / "old.zarr"),
                                  "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "older layout" in r.output and "cache it again" in r.output, r.output


def _toml(tmp_path, cfg) -> str:
    lines = []
    for table, values in cfg.to_dict().items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
    path = tmp_path / "cfg.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)
