"""Remote stores read through the local disk cache, against moto on the loopback address behind a
latency-adding, request-counting middleware (`helpers/s3_server.py`): each object downloaded whole
and once, no size request per read, a second reader served from the cache, a rewritten store never
served stale, the least recently used entries evicted under the limit; one writer at a time by a
conditional PUT; failures of the bucket as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dbcore.data import store
from dbcore.data.stream import BatchStream
from dbcore.method.batch import INDEX

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from s3_server import S3Server, environment  # noqa: E402

BUCKET = "dbcore-cache-test"


@pytest.fixture(scope="module")
def server():
    s = S3Server(delay=0.005).start()
    saved = {k: os.environ.get(k) for k in environment(s.url)}
    os.environ.update(environment(s.url))
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield s
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    s.stop()


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh disk cache for the test; the environment's settings again afterwards."""
    store.configure_cache(tmp_path / "cache", 1 << 30)
    yield tmp_path / "cache" / "objects"
    store.configure_cache(reset=True)


def _write(url: str, rows: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.standard_normal((rows, 64)).astype(np.float16),  # uncompressed
              "labels": rng.integers(0, 10, rows).astype(np.int64)}  # zstd
    s = store.create(url, overwrite=True)
    for name, a in arrays.items():
        s.write_array(name, a, chunks=32, shards=128)
    s.finalize()
    return arrays


def _objects(prefix: str) -> int:
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return listed.get("KeyCount", 0)


def _epoch(url: str) -> tuple[np.ndarray, np.ndarray]:
    batches = list(BatchStream(url, ["x", "labels"], batch_size=64, seed=3, shuffle="exact", threads=2))
    return np.concatenate([b[INDEX] for b in batches]), np.concatenate([b["x"] for b in batches])


def test_each_object_is_downloaded_once_and_a_second_reader_reads_the_cache(server, cache_dir):
    url = f"s3://{BUCKET}/once.zarr"
    arrays = _write(url)
    objects = _objects("once.zarr")
    server.reset()
    index, x = _epoch(url)
    assert sorted(index) == list(range(512))
    np.testing.assert_array_equal(x, arrays["x"][index])
    counts = server.counts()
    assert counts.get("HEAD", 0) == 0, counts  # sizes come from the listing
    assert counts.get("GET", 0) <= objects, (counts, objects)  # whole objects, once each
    assert counts.get("LIST", 0) == 1, counts
    server.reset()
    index2, x2 = _epoch(url)  # a new store handle: served from the disk cache
    np.testing.assert_array_equal(x2, x)
    assert server.counts() == {"LIST": 1}, server.counts()
    np.testing.assert_array_equal(store.open(url).read("labels"), arrays["labels"])


def test_a_rewritten_store_is_never_served_stale(server, cache_dir):
    url = f"s3://{BUCKET}/rewritten.zarr"
    _write(url, seed=1)
    first = store.open(url).read("x")
    new = _write(url, seed=2)
    again = store.open(url).read("x")
    np.testing.assert_array_equal(again, new["x"])
    assert not np.array_equal(first, again)


def test_the_least_recently_used_objects_are_evicted_under_the_limit(server, tmp_path):
    url = f"s3://{BUCKET}/evicted.zarr"
    arrays = _write(url, rows=1024)
    limit = 100_000  # under the store's ~140 KB of shards
    store.configure_cache(tmp_path / "cache", limit)
    try:
        index, x = _epoch(url)
        np.testing.assert_array_equal(x, arrays["x"][index])
        held = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file())
        assert 0 < held <= limit
    finally:
        store.configure_cache(reset=True)


def test_a_store_larger_than_the_cache_is_read_in_shard_order_once_an_epoch(server, tmp_path):
    url = f"s3://{BUCKET}/larger.zarr"
    arrays = _write(url, rows=1024)
    objects = _objects("larger.zarr")
    store.configure_cache(tmp_path / "cache", 100_000)  # under the store's ~140 KB
    try:
        for epoch in (0, 1):
            server.reset()
            st = BatchStream(url, ["x", "labels"], batch_size=64, seed=3, epoch=epoch, threads=2)
            batches = list(st)
            index = np.concatenate([b[INDEX] for b in batches])
            assert sorted(index) == list(range(1024))  # still a permutation
            np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), arrays["x"][index])
            # shards in a shuffled order, rows shuffled within a window of shards
            shard = index // 128
            assert (np.diff(shard) != 0).sum() < 16 and not np.array_equal(index, np.sort(index))
            # each object once (+2: object_store retries a request that fails under load)
            assert server.counts().get("GET", 0) <= objects + 2, server.counts()
    finally:
        store.configure_cache(reset=True)


def test_with_the_cache_off_reads_go_to_the_bucket(server, tmp_path):
    url = f"s3://{BUCKET}/direct.zarr"
    arrays = _write(url)
    store.configure_cache(tmp_path / "cache", 0)
    try:
        np.testing.assert_array_equal(store.open(url).read("x"), arrays["x"])
        assert not (tmp_path / "cache").exists()
    finally:
        store.configure_cache(reset=True)


def test_one_writer_at_a_time(server):
    url = f"s3://{BUCKET}/locked.zarr"
    s3 = boto3.client("s3")
    with store.writer_lock(url):
        record = json.loads(s3.get_object(Bucket=BUCKET, Key=".locked.zarr.lock")["Body"].read())
        assert record["expires"] > time.time() and ":" in record["holder"]
        with pytest.raises(store.StoreLockedError) as e:
            with store.writer_lock(url):
                pass
        msg = str(e.value)
        assert "\n" not in msg and "another process" in msg and "break_lock=True" in msg, msg
        with store.writer_lock(url, break_lock=True):  # taken over on request
            pass
    keys = s3.list_objects_v2(Bucket=BUCKET, Prefix=".locked").get("KeyCount", 0)
    assert keys == 0  # released
    # A killed writer's lock, its lease run out: taken over.
    dead = {"holder": "elsewhere:1:0", "what": "store", "since": 0, "expires": time.time() - 1}
    s3.put_object(Bucket=BUCKET, Key=".locked.zarr.lock", Body=json.dumps(dead).encode())
    with store.writer_lock(url):
        pass
    # A live lease of a process of this machine that is gone (a restart after a crash): taken over.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = record["holder"].split(":")[0]
    crashed = {"holder": f"{host}:{gone.pid}:0", "what": "store", "since": 0, "expires": time.time() + 99}
    s3.put_object(Bucket=BUCKET, Key=".locked.zarr.lock", Body=json.dumps(crashed).encode())
    with store.writer_lock(url):
        pass


def test_a_lease_is_renewed_while_held_and_a_broken_lock_is_left_to_its_new_holder(server):
    from dbcore import _native

    s3 = boto3.client("s3")
    url, key = f"s3://{BUCKET}/leased.zarr", ".leased.zarr.lock"

    def record() -> dict:
        return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    lock = _native.RemoteLock(url, "store", 0.6)
    first = record()
    time.sleep(0.7)
    assert record()["expires"] > first["expires"]  # renewed every 0.2 s
    other = _native.RemoteLock(url, "store", 60.0, True)  # broken by another writer
    time.sleep(0.5)
    assert record()["holder"] != first["holder"]  # not renewed over
    lock.release()  # leaves the other's lock
    assert record()["holder"] != first["holder"]
    other.release()
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount", 0) == 0


def test_two_caches_of_one_s3_store_one_is_refused(server, tmp_path):
    from click.testing import CliRunner

    from dbcore.cli import main

    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[model]\nimage_size = 8\nchannels = 1\npatch_size = 4\ndim = 16\ndepth = 2\n"
                   "heads = 2\nmlp_ratio = 2.0\nnum_blocks = 2\n[train]\nsteps = 1\nbatch_size = 8\n")
    url = f"s3://{BUCKET}/two.zarr"
    with store.writer_lock(url):  # the first writer, mid-way
        r = CliRunner().invoke(main, ["cache", str(cfg), "--out", url])
    assert r.exit_code == 1 and "another process" in r.output and "--break-lock" in r.output, r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["cache", str(cfg), "--out", url])
    assert r.exit_code == 0, r.output


def test_bucket_failures_are_one_line(server, monkeypatch):
    url = f"s3://no-such-bucket-{os.getpid()}/x.zarr"
    with pytest.raises(store.StoreError) as e:
        store.open(url)
    assert "does not exist" in str(e.value) and "\n" not in str(e.value), e.value
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(store.StoreError) as e:
        store.open(f"s3://{BUCKET}/x.zarr")
    assert "does not answer" in str(e.value) and "AWS_ENDPOINT_URL" in str(e.value), e.value
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("MOTO_S3_CHECK_SIGNATURE", "1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(store.StoreError) as e:
        store.open(f"s3://{BUCKET}/x.zarr")
    assert "no S3 credentials" in str(e.value) and "AWS_ACCESS_KEY_ID" in str(e.value), e.value


def test_source_and_run_failures_share_the_wording(server, monkeypatch):
    from dbcore.data.location import glob_files
    from dbcore.errors import SourceError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(SourceError) as e:
        glob_files(f"s3://{BUCKET}/corpus/*.txt")
    assert "does not answer" in str(e.value) and "AWS_ENDPOINT_URL" in str(e.value), e.value
