"""dbcore.data.stream.BatchStream: order, sharding, workers, resume, noise, faults, concurrency, fork."""

import multiprocessing as mp
import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dbcore import _native
from dbcore.data import store
from dbcore.data.stream import BatchStream
from dbcore.method import layout, rng
from dbcore.method.batch import EPS, INDEX, UNIFORMS
from dbcore.method.noise import block_noise
from dbcore.recipes import for_config
from dbcore.runs.process_memory import status_bytes

N = 1000


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("stream") / "s.zarr"
    s = store.create(p)
    s.write_array("x", np.arange(N * 6, dtype=np.float32).reshape(N, 6), chunks=50, shards=200)
    s.write_array("z", np.arange(N * 3 * 2, dtype=np.int32).reshape(N, 3, 2), chunks=64)
    s.write_array("y", np.arange(N, dtype=np.int64), chunks=100)
    s.finalize()
    return p


X = np.arange(N * 6, dtype=np.float32).reshape(N, 6)
Z = np.arange(N * 3 * 2, dtype=np.int32).reshape(N, 3, 2)


def _epoch(stream):
    return list(stream)


def test_rows_draws_and_coverage(path):
    s = BatchStream(path, ["x", "z", "y"], 64, draw=["z"], seed=3, chunk_rows=50)
    assert len(s) == 16 and s.num_samples == N
    orders = []
    for epoch in range(4):
        idx = []
        for b in _epoch(s):
            i = b[INDEX]
            assert b["x"].dtype == np.float32 and b["x"].shape == (len(i), 6)
            np.testing.assert_array_equal(b["x"], X[i])
            np.testing.assert_array_equal(b["z"], Z[i, epoch % 3])
            np.testing.assert_array_equal(b["y"], i)
            idx.append(i)
        idx = np.concatenate(idx)
        assert sorted(idx) == list(range(N))
        np.testing.assert_array_equal(idx, s.order(epoch))
        orders.append(idx)
    assert s.epoch == 4
    assert not np.array_equal(orders[0], orders[1])
    again = BatchStream(path, ["y"], 64, seed=3, chunk_rows=50)  # same unit: same order
    np.testing.assert_array_equal(np.concatenate([b[INDEX] for b in again]), orders[0])


def test_window_is_chunk_local(path):
    s = BatchStream(path, ["x"], 10, seed=1, chunk_rows=50, window_chunks=2)
    order = s.order(0)
    for w in range(0, N, 100):  # each window of 2 chunks holds exactly 2 whole chunks
        chunks = np.unique(order[w : w + 100] // 50)
        assert len(chunks) == 2
    seq = BatchStream(path, ["x"], 10, shuffle=False)
    np.testing.assert_array_equal(seq.order(0), np.arange(N))
    ex = BatchStream(path, ["x"], 10, shuffle="exact", seed=1)
    assert sorted(ex.order(0)) == list(range(N)) and not np.array_equal(ex.order(0), ex.order(1))


@pytest.mark.parametrize(("world", "drop_last"), [(1, False), (3, False), (3, True), (4, True)])
def test_sharding_no_duplicate_no_gap(path, world, drop_last):
    got = []
    for rank in range(world):
        s = BatchStream(path, ["y"], 32, seed=5, rank=rank, world_size=world, drop_last=drop_last)
        np.testing.assert_array_equal(s.order(0), BatchStream(path, ["y"], 7, seed=5).order(0))
        got.append(np.concatenate([b[INDEX] for b in s]))
        assert len(got[-1]) == s.num_samples
    allidx = np.concatenate(got)
    assert len(np.unique(allidx)) == len(allidx)
    if drop_last:
        assert len(allidx) == N // (32 * world) * 32 * world
        assert len({len(g) for g in got}) == 1
    else:
        assert len(allidx) == N


def test_dataloader_workers_same_order(path):
    s = BatchStream(path, ["x", "y"], 50, seed=2)
    ref = [b[INDEX] for b in BatchStream(path, ["x", "y"], 50, seed=2)]
    for ctx in ("fork", "spawn"):
        dl = DataLoader(s, batch_size=None, num_workers=2, multiprocessing_context=ctx)
        got = [b[INDEX].numpy() for b in dl]
        assert len(got) == len(ref) == len(dl)
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_array_equal(a, b)


def test_resume_mid_epoch(path):
    s = BatchStream(path, ["x"], 64, seed=9)
    full = [b[INDEX] for b in BatchStream(path, ["x"], 64, seed=9, epoch=1)]
    next(iter(s))  # finish nothing of epoch 0 but one batch, then move to epoch 1 explicitly
    s.set_epoch(1)
    it = iter(s)
    first = [next(it)[INDEX] for _ in range(5)]
    state = s.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5
    del it
    r = BatchStream(path, ["x"], 64, seed=9)
    r.load_state_dict(state)
    assert r.remaining == len(r) - 5
    rest = [b[INDEX] for b in r]
    for a, b in zip(first + rest, full, strict=True):
        np.testing.assert_array_equal(a, b)
    assert r.state_dict()["epoch"] == 2
    with pytest.raises(ValueError):
        BatchStream(path, ["x"], 32, seed=9).load_state_dict(state)


def test_philox_matches_rng():
    for ctr, key in [((0, 0, 0, 0), (0, 0)), ((1, 2, 3, 4), (5, 6)), ((2**32 - 1,) * 4, (2**32 - 1,) * 2)]:
        t = tuple(torch.tensor([c], dtype=torch.int64) for c in ctr)
        assert list(_native.philox4x32(list(ctr), list(key))) == [
            int(v) for v in rng.philox4x32(t, key[0] | key[1] << 32)]
    samples = np.arange(0, 5000, 7, dtype=np.uint64)
    u = _native.uniform_for_sigma(samples, 2**40 + 3, 1, 2)
    np.testing.assert_array_equal(u, rng.uniform_for_sigma(torch.from_numpy(samples.astype(np.int64)),
                                                            2**40 + 3, 1, 2).numpy())
    g = _native.gaussian(samples, 97, 11, 3, 4).reshape(len(samples), 97)
    ref = rng.gaussian(torch.from_numpy(samples.astype(np.int64)), 97, 11, 3, 4).numpy()
    # same uint32 words; the f64 transcendentals may differ from torch's in the last bit
    np.testing.assert_allclose(g, ref, rtol=1e-14, atol=1e-14)
    assert (g == ref).mean() > 0.9
    ts = torch.from_numpy(samples.astype(np.int64))
    for count in (0, 1, 3, 7, 13):
        u = _native.uniforms(samples, count, 2**40 + 3, 1, 2).reshape(len(samples), count)
        np.testing.assert_array_equal(u, rng.uniforms_of(ts, count, 2**40 + 3, 1, 2).numpy())
    with pytest.raises(_native.NativeError, match="would meet"):
        _native.uniforms(samples, 2**34 + 4, 0, 0, 0)


@pytest.mark.parametrize(("gaussians", "uniforms"), [(0, 3), (10, 1), (7, 5), (3, 0), (0, 0)])
def test_online_noise_counts(path, gaussians, uniforms):
    seed, block = 2**33 + 1, 2
    s = BatchStream(path, ["y"], 96, seed=4, world_size=2, rank=1, noise=(seed, block, gaussians, uniforms))
    for epoch in range(2):
        for b in s:
            idx = torch.from_numpy(b[INDEX])
            m = len(idx)
            assert (EPS in b) == (gaussians > 0) and (UNIFORMS in b) == (uniforms > 0)
            if gaussians:
                assert b[EPS].dtype == np.float64 and b[EPS].shape == (m, gaussians)
                ref = rng.gaussian(idx, gaussians, seed, block, epoch).numpy()
                np.testing.assert_allclose(b[EPS], ref, rtol=1e-14, atol=1e-14)
                assert (b[EPS] == ref).mean() > 0.9
            if uniforms:
                assert b[UNIFORMS].dtype == np.float64 and b[UNIFORMS].shape == (m, uniforms)
                ref = rng.uniforms_of(idx, uniforms, seed, block, epoch).numpy()
                np.testing.assert_array_equal(b[UNIFORMS], ref)
                np.testing.assert_array_equal(b[UNIFORMS][:, 0],
                                              rng.uniform_for_sigma(idx, seed, block, epoch).numpy())


def test_online_noise_on_empty_batches(path):
    # 1000 = 3 * 333 + 1: ranks 0 and 1 get an empty last batch, which still carries (0, k) noise
    s = BatchStream(path, ["y"], 333, rank=0, world_size=3, noise=(1, 0, 6, 2))
    last = list(s)[-1]
    assert last[EPS].shape == (0, 6) and last[UNIFORMS].shape == (0, 2)


def test_bad_noise_request(path):
    with pytest.raises(ValueError, match="gaussians, uniforms"):
        BatchStream(path, ["y"], 8, noise=(1, 0, 6))
    with pytest.raises(ValueError, match="would meet"):
        BatchStream(path, ["y"], 8, noise=(1, 0, 2**34, 2**33))
    with pytest.raises(ValueError):
        BatchStream(path, ["y"], 8, noise=(1, 0, -1, 1))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from dbcore import config as config_mod
    from dbcore.data.cache import write_cache
    from dbcore.data.sources import load_source

    d = tmp_path_factory.mktemp("cache")
    (d / "t.toml").write_text("[model]\nimage_size = 8\nchannels = 1\npatch_size = 4\ndim = 32\ndepth = 2\n"
                              "heads = 2\nnum_blocks = 2\n[train]\nbatch_size = 32\n")
    cfg = config_mod.load(d / "t.toml")
    src = load_source("digits:train")
    write_cache(cfg, src, d / "cached.zarr", noise="cached", draws=3, seed=4, progress=False)
    write_cache(cfg, src, d / "online.zarr", noise="online", seed=4, progress=False)
    return cfg, d


def test_block_noise_cached_and_online_agree(caches):
    cfg, d = caches
    emb = torch.from_numpy(store.open(d / "online.zarr").read(layout.TARGET_EMBEDDING))
    for block in range(2):
        cached = BatchStream.for_block(d / "cached.zarr", block, 100, seed=1, chunk_rows=256)
        online = BatchStream.for_block(d / "online.zarr", block, 100, seed=1, chunk_rows=256)
        for _ in range(3):  # epochs 0..2: the online draw = epoch = the cached draw epoch % 3
            for bc, bo in zip(cached, online, strict=True):
                np.testing.assert_array_equal(bc[INDEX], bo[INDEX])
                assert EPS in bo and UNIFORMS in bo and EPS not in bc and UNIFORMS in bc
                assert bo[UNIFORMS].shape == (len(bo[INDEX]), 1)
                np.testing.assert_array_equal(bc[UNIFORMS], bo[UNIFORMS])
                y = emb[torch.from_numpy(bo[layout.LABELS])]
                law = for_config(cfg).sigma_law(block)
                c = block_noise(bc, y, block, cached.epoch, law, seed=0)
                o = block_noise(bo, y, block, online.epoch, law, seed=0)
                zc, sc, zo, so = c.z, c.sigma, o.z, o.sigma
                torch.testing.assert_close(so, sc, rtol=0, atol=0)
                torch.testing.assert_close(zo, zc, rtol=1e-6, atol=1e-6)


def test_corrupt_chunk_names_array_and_chunk(tmp_path):
    p = tmp_path / "c.zarr"
    s = store.create(p)
    s.write_array("x", np.arange(400 * 4, dtype=np.float32).reshape(400, 4), chunks=20, shards=0)
    s.finalize()
    chunk = p / "x" / "c" / "7" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    bs = BatchStream(p, ["x"], 16, shuffle=False, window_chunks=1)
    it = iter(bs)
    for _ in range(8):  # rows 0..127 come from good chunks
        next(it)
    with pytest.raises(store.CorruptStoreError, match=r"array 'x'.*chunk 7 .*rows 140\.\.160"):
        list(it)


def test_incomplete_store_refused(tmp_path):
    s = store.create(tmp_path / "w.zarr")
    s.write_array("x", np.zeros((10, 2), np.float32))
    with pytest.raises(store.IncompleteStoreError):
        BatchStream(tmp_path / "w.zarr", ["x"], 4)
    with pytest.raises(store.StoreNotFoundError):
        BatchStream(tmp_path / "w.zarr", ["nope"], 4) if s.finalize() is None else None


def test_several_readers_at_once(path):
    ref = np.concatenate([b[INDEX] for b in BatchStream(path, ["x", "y"], 32, seed=7)])
    errors, results = [], {}

    def read(k):
        try:
            s = BatchStream(path, ["x", "y"], 32, seed=7, threads=2)
            out = []
            for b in s:
                np.testing.assert_array_equal(b["x"], X[b[INDEX]])
                out.append(b[INDEX])
            results[k] = np.concatenate(out)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for v in results.values():
        np.testing.assert_array_equal(v, ref)


def _child(path, q):
    s = _PARENT_STREAM
    q.put(np.concatenate([b[INDEX] for b in s]).tolist())


_PARENT_STREAM = None


def test_fork_after_use(path):
    global _PARENT_STREAM
    s = BatchStream(path, ["x"], 32, seed=8)
    it = iter(s)
    next(it)  # threads running in the parent at fork time
    _PARENT_STREAM = BatchStream(path, ["x"], 32, seed=8)
    list(_PARENT_STREAM)  # used in the parent: epoch 1 next
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_child, args=(path, q))
    p.start()
    got = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0
    assert got == _PARENT_STREAM.order(1).tolist()
    rest = [b[INDEX] for b in it]
    assert len(rest) == len(s) - 1


def test_bad_arguments(path):
    with pytest.raises(ValueError):
        BatchStream(path, ["x"], 0)
    with pytest.raises(ValueError):
        BatchStream(path, ["x"], 4, rank=2, world_size=2)
    with pytest.raises(ValueError):
        BatchStream(path, ["x"], 4, threads=99)
    with pytest.raises(store.StoreValueError):
        BatchStream(path, ["x", "y"], 4, draw=["y"])  # y is 1-D: no draws axis


@pytest.mark.parametrize("shuffle", ["chunks", "exact"])
def test_uncompressed_store_streams_the_same(path, tmp_path, shuffle):
    p = tmp_path / "u.zarr"
    s = store.create(p)
    s.write_array("x", X, chunks=50, shards=200, compression=None)
    s.write_array("z", Z, chunks=64, compression=None)
    s.write_array("y", np.arange(N, dtype=np.int64), chunks=100, compression=None)
    s.finalize()
    kw = dict(draw=["z"], seed=5, chunk_rows=50, shuffle=shuffle, window_chunks=3)
    a = BatchStream(path, ["x", "z", "y"], 48, **kw)
    b = BatchStream(p, ["x", "z", "y"], 48, **kw)
    for _ in range(2):
        for ba, bb in zip(a, b, strict=True):
            assert ba.keys() == bb.keys()
            for k in ba:
                np.testing.assert_array_equal(ba[k], bb[k])


def test_empty_rank_batch(path):
    # 1000 = 3 * 333 + 1: the last global batch has one sample, ranks 0 and 1 get empty batches
    for rank in range(3):
        s = BatchStream(path, ["y"], 333, rank=rank, world_size=3, seed=0)
        sizes = [len(b[INDEX]) for b in s]
        assert len(sizes) == len(s) == 2 and sizes == [333, 1 if rank == 2 else 0]


def test_held_batches_keep_their_rows_while_buffers_are_reused(path):
    s = BatchStream(path, ["x", "z"], 64, draw=["z"], seed=2, chunk_rows=50)
    held = list(s)  # epoch 0, all held
    for b in s:  # epoch 1: buffers given back in between are reused
        b["x"][:] = -1  # batches are writable
    del b
    for b in held:
        np.testing.assert_array_equal(b["x"], X[b[INDEX]])
        np.testing.assert_array_equal(b["z"], Z[b[INDEX], 0])


X4 = np.arange(400 * 4, dtype=np.float32).reshape(400, 4)


@pytest.mark.parametrize("shards", [0, 100])
def test_truncated_uncompressed_file_is_corrupt_not_sigbus(tmp_path, shards):
    # Uncompressed files are read through memory maps: a file shorter than what the read needs
    # (a chunk file cut short, or a shard cut in the middle with its index intact, so the index
    # points past the end of the file) must give the corrupt-store error naming array and chunk.
    p = tmp_path / "t.zarr"
    s = store.create(p)
    s.write_array("x", X4, chunks=20, shards=shards, compression=None)
    s.finalize()
    if shards:
        victim = p / "x" / "c" / "1" / "0"  # rows 100..200: inner chunks 5..9
        data = victim.read_bytes()
        index = 5 * 16 + 4  # 5 inner chunks x (offset, length) + crc32c, at the end
        victim.write_bytes(data[: 2 * 20 * 16] + data[-index:])  # keeps inner chunks 5, 6
    else:
        victim = p / "x" / "c" / "7" / "0"
        victim.write_bytes(victim.read_bytes()[:10])
    bs = BatchStream(p, ["x"], 20, shuffle=False, window_chunks=1)
    it = iter(bs)
    for i in range(7):  # rows 0..139 come from good chunks
        np.testing.assert_array_equal(next(it)["x"], X4[i * 20 : (i + 1) * 20])
    with pytest.raises(store.CorruptStoreError, match=r"array 'x'.*chunk 7 .*rows 140\.\.160"):
        list(it)


def test_uncompressed_maps_survive_epochs_and_overwrite(tmp_path):
    # The maps live as long as the stream; a store overwritten (files replaced) under a running
    # stream keeps giving the old rows rather than faulting.
    p = tmp_path / "m.zarr"
    s = store.create(p)
    s.write_array("x", X4, chunks=20, shards=100, compression=None)
    s.finalize()
    bs = BatchStream(p, ["x"], 16, seed=3, chunk_rows=20)
    for _ in range(3):
        for b in bs:
            np.testing.assert_array_equal(b["x"], X4[b[INDEX]])
    s = store.create(p, overwrite=True)
    s.write_array("x", -X4, chunks=20, shards=100, compression=None)
    s.finalize()
    for b in bs:
        np.testing.assert_array_equal(b["x"], X4[b[INDEX]])


def test_online_noise_is_drawn_per_batch_not_per_window(tmp_path):
    """A wide noise request over a large shuffle window holds the noise of the batches taken, not
    of the window: 16,384 rows x 8,192 Gaussians would be 1 GiB of float64 for the window."""
    s = store.create(tmp_path / "w.zarr")
    s.write_array("y", np.arange(16384, dtype=np.int64), chunks=4096)
    s.finalize()
    stream = BatchStream(tmp_path / "w.zarr", ["y"], 64, noise=(0, 1, 8192, 1), prefetch=2)
    assert stream.plan["window_chunks"] * stream.plan["chunk_rows"] >= 16384  # one window: every row
    before = status_bytes("RssAnon")
    held = []
    for batch in stream:
        held.append(batch)
        if len(held) == 4:
            break
    grown = status_bytes("RssAnon") - before
    assert grown < 96 * 2**20, f"{grown / 2**20:.0f} MiB for 4 batches of 4 MiB of noise"
    for batch in held:  # the values are the generator's (Rust's libm and torch agree to 1e-14)
        expect = rng.gaussian(torch.from_numpy(batch[INDEX]), 8192, 0, 1, 0).numpy()
        np.testing.assert_allclose(batch[EPS], expect, rtol=1e-14, atol=1e-14)


def test_a_shuffle_window_in_bytes(path):
    s = store.open(path)
    row_bytes = 6 * 4 + 8  # x float32 (6,), y int64
    default = BatchStream(s, ["x", "y"], 8).plan
    chunk = default["chunk_rows"]
    assert default["window_bytes"] == default["window_chunks"] * chunk * row_bytes
    plan = BatchStream(s, ["x", "y"], 8, window_bytes=row_bytes * (2 * chunk + 1)).plan
    assert plan["window_chunks"] == 2 and plan["window_bytes"] == 2 * chunk * row_bytes
    with pytest.raises(store.StoreError, match="fewer than one batch"):
        BatchStream(s, ["x", "y"], 4 * chunk, window_bytes=row_bytes * 3 * chunk)
    with pytest.raises(ValueError, match="at most the memory available"):
        BatchStream(s, ["x", "y"], 8, window_bytes=2**62)
