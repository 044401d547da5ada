"""dbcore.data.store: every failure is a StoreError naming the store, the array and the problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dbcore.data import store


def _complete(path: Path, shards: int = 0, compression: str | None = "zstd") -> Path:
    s = store.create(path)
    s.write_array("x", np.arange(4000, dtype="float32").reshape(1000, 4), chunks=100, shards=shards,
                  compression=compression)
    s.finalize()
    return path


def _chunk_files(array_dir: Path) -> list[Path]:
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())


def test_create_refuses_existing_path(tmp_path):
    p = _complete(tmp_path / "s.zarr")
    with pytest.raises(store.StoreExistsError, match="overwrite=True"):
        store.create(p)
    assert isinstance(store.StoreExistsError("x"), FileExistsError)
    s = store.create(p, overwrite=True)
    assert s.arrays() == []


def test_overwrite_refuses_non_store_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(store.StoreExistsError, match="not a Zarr store"):
        store.create(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").exists()


def test_incomplete_store_is_refused(tmp_path):
    p = tmp_path / "s.zarr"
    s = store.create(p)
    s.write_array("x", np.zeros((10, 2), "float32"))
    with pytest.raises(store.IncompleteStoreError, match="never finalized") as e:
        store.open(p)
    assert str(p) in str(e.value)
    s2 = store.open(p, require_complete=False)
    assert not s2.complete and s2.arrays() == ["x"]


def test_new_array_after_finalize_needs_another_finalize(tmp_path):
    p = _complete(tmp_path / "s.zarr")
    s = store.open(p)
    s.write_array("y", np.ones(5, "int32"))
    with pytest.raises(store.IncompleteStoreError):
        store.open(p)
    s.finalize()
    assert store.open(p).arrays() == ["x", "y"]


def test_missing_store(tmp_path):
    with pytest.raises(store.StoreNotFoundError, match="no such store"):
        store.open(tmp_path / "nope.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(store.StoreNotFoundError, match="not a Zarr group"):
        store.open(tmp_path / "empty")


@pytest.mark.parametrize("compression", ["zstd", None])
@pytest.mark.parametrize("shards", [0, 400])
def test_truncated_chunk(tmp_path, shards, compression):
    p = _complete(tmp_path / "s.zarr", shards, compression)
    victim = _chunk_files(p / "x")[1]
    os.truncate(victim, victim.stat().st_size // 2)
    s = store.open(p)
    with pytest.raises(store.CorruptStoreError) as e:
        s.read("x")
    assert str(p) in str(e.value) and "'x'" in str(e.value)
    with pytest.raises(store.CorruptStoreError):
        s.read("x", np.arange(0, 1000, 7))


def test_garbage_in_chunk(tmp_path):
    p = _complete(tmp_path / "s.zarr")
    victim = _chunk_files(p / "x")[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(store.CorruptStoreError, match="'x'"):
        store.open(p).read("x", slice(0, 100))


def test_garbage_array_metadata(tmp_path):
    p = _complete(tmp_path / "s.zarr")
    (p / "x" / "zarr.json").write_text("{ not json")
    with pytest.raises(store.CorruptStoreError, match="bad metadata") as e:
        store.open(p)
    assert "'x'" in str(e.value)


def test_garbage_group_metadata(tmp_path):
    p = _complete(tmp_path / "s.zarr")
    (p / "zarr.json").write_bytes(b"\x00\x01garbage")
    with pytest.raises(store.CorruptStoreError, match="group metadata"):
        store.open(p)


def test_missing_array(tmp_path):
    p = _complete(tmp_path / "s.zarr")
    (p / "x" / "zarr.json").unlink()
    with pytest.raises(store.CorruptStoreError, match="no such array"):
        store.open(p)
    s = store.open(p, require_complete=False)
    with pytest.raises(store.StoreNotFoundError, match="'y'"):
        s.read("y")


def test_recorded_dtype_or_shape_changed(tmp_path):
    p = _complete(tmp_path / "s.zarr")
    meta = json.loads((p / "x" / "zarr.json").read_text())
    meta["data_type"] = "int32"
    (p / "x" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(store.CorruptStoreError, match="recorded"):
        store.open(p)


def test_newer_format_refused(tmp_path):
    p = _complete(tmp_path / "s.zarr")
    meta = json.loads((p / "zarr.json").read_text())
    meta["attributes"]["dbcore"]["format"] = 99
    (p / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(store.CorruptStoreError, match="newer"):
        store.open(p)


def test_dtype_checks(tmp_path):
    s = store.open(_complete(tmp_path / "s.zarr"))
    with pytest.raises(store.DTypeError, match="expected int64"):
        s.read("x", dtype="int64")
    assert s.read("x", slice(0, 2), dtype="float32").shape == (2, 4)
    s2 = store.create(tmp_path / "t.zarr")
    with pytest.raises(store.DTypeError, match="unsupported dtype"):
        s2.write_array("c", np.zeros(3, "complex64"))
    w = s2.array_writer("w", (10, 2), "float16")
    with pytest.raises(store.DTypeError, match="float32"):
        w.write(0, np.zeros((10, 2), "float32"))
    with pytest.raises(store.StoreValueError, match="shape"):
        w.write(0, np.zeros((10, 3), "float16"))


def test_bad_rows_and_names(tmp_path):
    s = store.open(_complete(tmp_path / "s.zarr"))
    with pytest.raises(store.StoreIndexError, match="1000"):
        s.read("x", [1000])
    with pytest.raises(IndexError):
        s.read("x", -1001)
    with pytest.raises(store.StoreValueError):
        s.read("x", np.array([0.5]))
    s2 = store.create(tmp_path / "t.zarr")
    w = s2.array_writer("w", (10, 2), "float32")
    with pytest.raises(store.StoreIndexError, match="out of range"):
        w.write(5, np.zeros((6, 2), "float32"))
    with pytest.raises(store.StoreValueError, match="invalid array name"):
        s2.write_array("../evil", np.zeros(3))
    with pytest.raises(store.StoreExistsError, match="'w' already exists"):
        s2.array_writer("w", (10, 2), "float32")
    with pytest.raises(store.StoreValueError, match="JSON"):
        store.create(tmp_path / "u.zarr", attrs={"x": object()})
    with pytest.raises(store.StoreValueError, match="reserved"):
        store.create(tmp_path / "v.zarr", attrs={"dbcore": 1})
