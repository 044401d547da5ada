"""`dbcore cache` writes streamed blocks, resumes an interrupted run, refuses to overwrite."""

import numpy as np
import pytest

from dbcore import config as config_mod
from dbcore.data import cache as cache_mod
from dbcore.data import store
from dbcore.data.cache import LEDGER, write_cache
from dbcore.data.sources import load_source
from dbcore.method import layout

TOML = (
    "[model]\nimage_size = 8\nchannels = 1\npatch_size = 4\ndim = 32\ndepth = 2\nheads = 2\n"
    "num_blocks = 2\n"
)


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "t.toml").write_text(TOML)
    return config_mod.load(tmp_path / "t.toml")


def _arrays(path):
    s = store.open(path)
    return {name: s.read(name) for name in s.arrays()}


def test_interrupted_cache_resumes_without_redoing(tmp_path, cfg, monkeypatch, interrupted_at_write):
    src = load_source("digits:train")
    monkeypatch.setattr(cache_mod, "WRITE_TARGET_BYTES", 4096)  # many small blocks:
    monkeypatch.setattr(cache_mod, "ROWS_PER_WRITE", 200)  # 8 per noise array
    ref = tmp_path / "ref.zarr"
    write_cache(cfg, src, ref, noise="cached", draws=2, seed=1, progress=False)
    assert not (ref / LEDGER).exists()

    out = tmp_path / "c.zarr"
    with interrupted_at_write(12):
        write_cache(cfg, src, out, noise="cached", draws=2, seed=1, progress=False)
    with pytest.raises(store.IncompleteStoreError):
        store.open(out)
    finished = (out / LEDGER).read_text().splitlines()
    assert 5 <= len(finished) <= 11

    written, real = [], store.ArrayWriter.write

    def recording(self, start, block):
        written.append((self.name, start))
        return real(self, start, block)

    monkeypatch.setattr(store.ArrayWriter, "write", recording)
    write_cache(cfg, src, out, noise="cached", draws=2, seed=1, progress=False)
    for line in finished:
        name, start = line.rsplit(" ", 1)
        assert (name, int(start)) not in written
    a, b = _arrays(out), _arrays(ref)
    assert a.keys() == b.keys() and layout.noised_z(1) in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert store.open(out).attrs == store.open(ref).attrs


def test_refuses_complete_or_foreign_store(tmp_path, cfg):
    src = load_source("digits:train")
    out = tmp_path / "c.zarr"
    write_cache(cfg, src, out, progress=False)
    with pytest.raises(store.StoreExistsError, match="complete"):
        write_cache(cfg, src, out, progress=False)
    write_cache(cfg, src, out, seed=3, overwrite=True, progress=False)
    assert store.open(out).attrs["noise"]["seed"] == 3
    s = store.create(tmp_path / "other.zarr", attrs={"x": 1})
    s.write_array("x", np.zeros(3))
    with pytest.raises(store.StoreExistsError, match="other inputs"):
        write_cache(cfg, src, tmp_path / "other.zarr", progress=False)
