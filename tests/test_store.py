"""dbcore.data.store: round trips, gathers, streamed writes, layouts (uses the installed wheel)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dbcore.data import store

DTYPES = ["uint8", "int32", "int64", "float16", "float32"]


def _data(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shards", [0, 16])
def test_round_trip(tmp_path, dtype, shards):
    x = _data(dtype, (103, 5, 3))
    s = store.create(tmp_path / "s.zarr", attrs={"kind": "test", "n": [1, 2]})
    s.write_array("x", x, chunks=8, shards=shards)
    s.finalize()
    s = store.open(tmp_path / "s.zarr")
    assert s.complete and s.attrs == {"kind": "test", "n": [1, 2]}
    assert s.arrays() == ["x"]
    y = s.read("x")
    assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(y, x)
    assert np.array_equal(s.read("x", slice(10, 50)), x[10:50])
    assert np.array_equal(s.read("x", slice(90, None, 3)), x[90::3])
    assert np.array_equal(s.read("x", slice(60, 50)), x[60:50])
    assert np.array_equal(s.read("x", -1), x[-1])
    rows = np.array([102, 0, 7, 7, 8, 64, -2, 33])
    assert np.array_equal(s.read("x", rows), x[rows])
    assert np.array_equal(s.read("x", [5]), x[[5]])
    assert s.read("x", np.array([], dtype=np.int64)).shape == (0, 5, 3)


def test_info_and_layout(tmp_path):
    s = store.create(tmp_path / "s.zarr")
    s.write_array("x", np.zeros((1000, 16), "float32"), chunks=100, shards=400)
    s.write_array("y", np.arange(10))
    info = s.info("x")
    assert info.shape == (1000, 16) and info.dtype == "float32"
    assert info.chunks == (100, 16) and info.shards == (400, 16)
    assert info.nbytes == 64000 and 0 < info.nbytes_stored < info.nbytes
    assert any(c["name"] == "sharding_indexed" for c in info.codecs)
    y = s.info("y")
    assert y.shards is None and y.chunks == (10,) and y.dtype == "int64"
    assert [c["name"] for c in y.codecs] == ["bytes", "zstd"]
    assert s.info("x").to_dict()["shape"] == (1000, 16)


def test_default_layout_shards_large_arrays(tmp_path):
    s = store.create(tmp_path / "s.zarr")
    x = _data("uint8", (50_000, 28, 28))
    s.write_array("images", x)
    info = s.info("images")
    assert info.shards is not None and info.shards[0] % info.chunks[0] == 0
    assert np.array_equal(s.read("images", [49_999, 3]), x[[49_999, 3]])


def test_streamed_writer_unaligned_blocks(tmp_path):
    x = _data("float16", (250, 12))
    s = store.create(tmp_path / "s.zarr")
    w = s.array_writer("h", x.shape, "float16", chunks=16, shards=64)
    for start in range(0, 250, 37):  # blocks straddle chunk and shard boundaries
        w.write(start, x[start : start + 37])
    s.finalize()
    assert np.array_equal(store.open(tmp_path / "s.zarr").read("h"), x)


def test_writer_buffers_partial_shards_until_close(tmp_path):
    x = _data("int32", (100, 4))
    s = store.create(tmp_path / "s.zarr")
    with s.array_writer("x", x.shape, "int32", chunks=10, shards=40) as w:
        w.write(0, x[:25])
        assert w.pending_rows == 25  # shard 0..40 not whole yet
        w.write(25, x[25:90])
        assert w.pending_rows == 10  # 0..80 on disk, 80..90 waits
        w.write(95, x[95:])
    s2 = store.open(tmp_path / "s.zarr", require_complete=False)
    y = s2.read("x")
    assert np.array_equal(y[:90], x[:90]) and np.array_equal(y[95:], x[95:])
    assert not y[90:95].any()  # never written: the fill value


def test_chunk_shape_tuple(tmp_path):
    s = store.create(tmp_path / "s.zarr")
    s.write_array("z", np.ones((40, 2, 3), "float32"), chunks=(8, 2, 3))
    assert s.info("z").chunks == (8, 2, 3)
    with pytest.raises(store.StoreValueError, match="rows only"):
        s.write_array("w", np.ones((40, 2, 3), "float32"), chunks=(8, 1, 3))


def test_non_contiguous_and_other_inputs(tmp_path):
    x = _data("int32", (30, 8))
    s = store.create(tmp_path / "s.zarr")
    s.write_array("t", x[:, ::2])
    s.write_array("f", np.asfortranarray(x))
    s.write_array("big_endian", x.astype(">i4"))
    assert np.array_equal(s.read("t"), x[:, ::2])
    assert np.array_equal(s.read("f"), x)
    assert np.array_equal(s.read("big_endian"), x)


def test_concurrent_reads(tmp_path):
    x = _data("float32", (4096, 64))
    s = store.create(tmp_path / "s.zarr")
    s.write_array("x", x, chunks=128)
    s.finalize()
    s = store.open(tmp_path / "s.zarr")
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(20):
                rows = rng.integers(0, 4096, 256)
                assert np.array_equal(s.read("x", rows), x[rows])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_empty_rows(tmp_path):
    s = store.create(tmp_path / "s.zarr")
    s.write_array("e", np.zeros((0, 4), "float32"))
    s.finalize()
    s = store.open(tmp_path / "s.zarr")
    assert s.read("e").shape == (0, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shards", [0, 16])
@pytest.mark.parametrize("row_shape", [(5, 3), (64, 80)])  # small rows: span reads; big: per row
def test_uncompressed_round_trip(tmp_path, dtype, shards, row_shape):
    x = _data(dtype, (103, *row_shape))
    s = store.create(tmp_path / "s.zarr")
    s.write_array("x", x, chunks=8, shards=shards, compression=None)
    s.finalize()
    s = store.open(tmp_path / "s.zarr")
    info = s.info("x")
    assert info.compression is None and info.nbytes_stored >= info.nbytes
    inner = info.codecs[0]["configuration"]["codecs"] if shards else info.codecs
    assert [c["name"] for c in inner] == ["bytes"]
    assert [c["name"] for c in info.codecs] == (["sharding_indexed"] if shards else ["bytes"])
    assert np.array_equal(s.read("x"), x)
    assert np.array_equal(s.read("x", slice(10, 50)), x[10:50])
    rows = np.array([102, 0, 7, 7, 8, 64, -2, 33, 9, 10, 11])
    assert np.array_equal(s.read("x", rows), x[rows])
    rows = np.random.default_rng(0).integers(0, 103, 300)
    assert np.array_equal(s.read("x", rows), x[rows])


@pytest.mark.parametrize("shards", [0, 24])
def test_uncompressed_missing_chunks_read_as_zeros(tmp_path, shards):
    s = store.create(tmp_path / "s.zarr")
    x = _data("float32", (48, 4096))  # rows of 16 KiB
    x[8:24] = 0  # all-zero chunks need not be stored
    w = s.array_writer("x", x.shape, x.dtype, chunks=8, shards=shards, compression=None)
    w.write(0, x[:8])
    w.write(16, x[16:])  # rows 8..16 are never written
    s.finalize()
    s = store.open(tmp_path / "s.zarr")
    assert np.array_equal(s.read("x"), x)
    rows = np.array([47, 9, 0, 17, 12, 30])
    assert np.array_equal(s.read("x", rows), x[rows])


def test_compression_argument(tmp_path):
    s = store.create(tmp_path / "s.zarr")
    s.write_array("a", np.arange(10), compression="zstd")
    s.write_array("b", np.arange(10), compression="none")
    assert s.info("a").compression == "zstd" and s.info("b").compression is None
    with pytest.raises(store.StoreValueError, match="compression"):
        s.write_array("c", np.arange(10), compression="lz4")
    assert "c" not in s.arrays()


@pytest.mark.parametrize("dtype, codec", [("float16", None), ("float32", None), ("float64", None),
                                          ("uint8", "zstd"), ("int64", "zstd"), ("bool", "zstd")])
def test_default_compression_by_dtype(tmp_path, dtype, codec):
    s = store.create(tmp_path / "s.zarr")
    x = np.arange(40).reshape(10, 4).astype(dtype)
    s.write_array("x", x)  # "auto": floats uncompressed, the rest zstd (benches/results/codec.json)
    s.finalize()
    assert s.info("x").compression == codec
    assert np.array_equal(store.open(tmp_path / "s.zarr").read("x"), x)
