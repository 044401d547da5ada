"""Interop with zarr-python 3, both ways, with and without sharding (and the zarrs pipeline)."""

from __future__ import annotations

import numpy as np
import pytest

from dbcore.data import store

zarr = pytest.importorskip("zarr")
from zarr.codecs import ZstdCodec  # noqa: E402

DTYPES = ["uint8", "int32", "int64", "float16", "float32"]


def _data(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(1)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 100, size=shape).astype(dtype)


@pytest.mark.parametrize("compression", ["zstd", None])
@pytest.mark.parametrize("shards", [0, 32])
def test_zarr_python_reads_dbcore(tmp_path, shards, compression):
    p = tmp_path / "s.zarr"
    s = store.create(p, attrs={"model": "vit", "blocks": [1, 2], "nested": {"a": 0.5}})
    xs = {dt: _data(dt, (77, 4, 3)) for dt in DTYPES}
    for dt, x in xs.items():
        s.write_array(dt, x, chunks=8, shards=shards, compression=compression)
    s.finalize()
    g = zarr.open_group(p, mode="r")
    assert g.metadata.zarr_format == 3
    assert g.attrs["model"] == "vit" and g.attrs["nested"] == {"a": 0.5}
    assert g.attrs["dbcore"]["complete"] is True
    for dt, x in xs.items():
        a = g[dt]
        assert a.dtype == np.dtype(dt) and a.chunks == (8, 4, 3)
        assert a.shards == ((32, 4, 3) if shards else None)
        assert len(a.compressors) == (1 if compression else 0)
        assert np.array_equal(a[:], x)
        rows = np.array([76, 0, 40, 9, 9])
        assert np.array_equal(a.oindex[rows], x[rows])


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("pipeline", ["default", "zarrs"])
def test_dbcore_reads_zarr_python(tmp_path, sharded, pipeline, compressed):
    if pipeline == "zarrs":
        pytest.importorskip("zarrs")
        cfg = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
    else:
        cfg = {}
    p = tmp_path / "z.zarr"
    with zarr.config.set(cfg):
        g = zarr.open_group(p, mode="w", zarr_format=3, attributes={"source": "zarr-python"})
        xs = {dt: _data(dt, (90, 6)) for dt in DTYPES}
        for dt, x in xs.items():
            a = g.create_array(
                dt,
                shape=x.shape,
                dtype=dt,
                chunks=(10, 6),
                shards=(30, 6) if sharded else None,
                compressors=ZstdCodec(level=3) if compressed else None,
            )
            a[:] = x
    s = store.open(p, require_complete=False)
    assert s.attrs == {"source": "zarr-python"} and not s.complete
    assert s.arrays() == sorted(DTYPES)
    for dt, x in xs.items():
        assert s.info(dt).chunks == (10, 6)
        assert s.info(dt).compression == ("zstd" if compressed else None)
        assert np.array_equal(s.read(dt), x)
        rows = np.array([89, 0, 45, 12, 12])
        assert np.array_equal(s.read(dt, rows), x[rows])
    with pytest.raises(store.IncompleteStoreError, match="not a dbcore store"):
        store.open(p)
