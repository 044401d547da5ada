"""Stores and runs at s3:// URLs, against an S3 server (moto) that the test starts on the loopback
address: the same values as on local disk, zarr-python reading what the Rust store wrote, the
whole cache -> train -> eval pipeline, and clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from dbcore.cli import main
from dbcore.data import store
from dbcore.data.stream import BatchStream
from dbcore.method.batch import INDEX
from dbcore.runs import mirror

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "dbcore-test"
TOML = """
[model]
image_size = 8
channels = 1
patch_size = 4
dim = 32
depth = 2
heads = 2
mlp_ratio = 2.0
num_blocks = 2

[train]
steps = 30
batch_size = 64
warmup_steps = 5
checkpoint_every = 10
threads = 1
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, the AWS variables pointing at it, one bucket; the URL."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "DBCORE_MIRROR": str(tmp_path_factory.mktemp("mirror")),
           "DBCORE_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _arrays(s: store.Store) -> dict[str, np.ndarray]:
    return {name: s.read(name) for name in s.arrays()}


def _write(where, rows: int = 300) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    data = {"h": rng.standard_normal((rows, 6, 5)).astype(np.float16),  # uncompressed (a float)
            "images": rng.integers(0, 255, (rows, 8, 8), dtype=np.uint8),  # zstd
            "labels": rng.integers(0, 10, rows)}
    s = store.create(where, attrs={"kind": "test"})
    s.write_array("h", data["h"], chunks=16, shards=64)
    s.write_array("images", data["images"], chunks=32)
    s.write_array("labels", data["labels"])
    s.finalize()
    return data


def test_a_store_on_s3_holds_what_was_written_and_zarr_python_reads_it(s3):
    import zarr

    url = f"{s3}/arrays.zarr"
    assert not store.exists(url)
    data = _write(url)
    assert store.exists(url)
    s = store.open(url)
    assert s.path == url and s.complete and s.attrs == {"kind": "test"}
    got = _arrays(s)
    assert got.keys() == data.keys() and all(np.array_equal(got[k], data[k]) for k in data)
    rows = np.array([299, 0, 17, 17, 150])
    assert np.array_equal(s.read("h", rows), data["h"][rows])
    assert s.info("images").nbytes_stored > 0 and s.info("h").compression is None
    endpoint = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    fs_store = zarr.storage.FsspecStore.from_url(url, read_only=True, storage_options=endpoint)
    group = zarr.open_group(fs_store, mode="r")
    for name in data:
        assert np.array_equal(group[name][:], data[name]), name  # zarr-python, straight from S3


def test_batches_streamed_from_s3_equal_those_from_local_disk(s3, tmp_path):
    _write(tmp_path / "local.zarr")
    _write(f"{s3}/stream.zarr")
    kwargs = {"batch_size": 64, "seed": 3, "noise": (0, 0, 2, 1)}
    local = list(BatchStream(tmp_path / "local.zarr", ["h", "images", "labels"], **kwargs))
    remote_ = list(BatchStream(f"{s3}/stream.zarr", ["h", "images", "labels"], **kwargs))
    assert len(local) == len(remote_) == 5
    for a, b in zip(local, remote_, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert len(np.unique(a[INDEX])) == len(a[INDEX])


def test_overwrite_replaces_an_s3_store_and_create_refuses_without_it(s3):
    url = f"{s3}/again.zarr"
    _write(url, rows=50)
    with pytest.raises(store.StoreExistsError, match="again.zarr"):
        store.create(url)
    s = store.create(url, overwrite=True)
    s.write_array("x", np.arange(3))
    s.finalize()
    assert store.open(url).arrays() == ["x"]  # nothing of the old store is left


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_cache_train_eval_on_s3_equal_local_disk(s3, tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TOML)
    results = {}
    for where, st, run in (("local", tmp_path / "c.zarr", tmp_path / "run"),
                           ("s3", f"{s3}/c.zarr", f"{s3}/run")):
        _cli("cache", cfg, "--out", st)
        _cli("train", cfg, "--store", st, "--out", run, "--quiet")
        results[where] = json.loads(_cli("eval", run, "--json"))
    assert results["s3"]["accuracy"] == results["local"]["accuracy"]
    assert results["s3"]["loss"] == results["local"]["loss"]
    fs = s3fs.S3FileSystem()
    keys = {k.rsplit("/", 1)[1] for k in fs.find(f"{BUCKET}/run")}
    assert {"run.json", "block0.json", "block0.safetensors", "block1.json", "block1.safetensors",
            "block0.jsonl", "block1.jsonl"} <= keys  # metrics/NAME.jsonl per block
    assert "images" in _cli("info", f"{s3}/c.zarr") and f"{s3}/c.zarr" in _cli("info", f"{s3}/c.zarr")
    assert "losses.png" in _cli("report", f"{s3}/run", "--out", tmp_path / "report")  # metrics of both blocks
    again = _cli("train", cfg, "--store", f"{s3}/c.zarr", "--out", f"{s3}/run", "--quiet")
    assert all(json.loads(line)["resumed_at"] == 30 for line in again.splitlines())  # nothing redone


def test_training_one_block_downloads_that_block_only(s3, tmp_path, monkeypatch):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TOML.replace("steps = 30", "steps = 10"))
    st, run = f"{s3}/one.zarr", f"{s3}/one-run"
    _cli("cache", cfg, "--out", st)
    _cli("train", cfg, "--store", st, "--out", run, "--quiet", "--block", "0")
    fresh = tmp_path / "fresh-mirror"  # another machine: an empty mirror
    monkeypatch.setenv("DBCORE_MIRROR", str(fresh))
    _cli("train", cfg, "--store", st, "--out", run, "--quiet", "--block", "1")
    local = fresh / "s3" / BUCKET / "one-run"
    assert (local / "block0.json").is_file() and (local / "block1.safetensors").is_file()
    assert not (local / "block0.safetensors").exists()  # block 1 never needs block 0's weights


def test_a_block_of_an_s3_run_is_trained_by_one_machine_at_a_time(s3, tmp_path, monkeypatch):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TOML.replace("steps = 30", "steps = 5"))
    st, run = f"{s3}/locks.zarr", f"{s3}/locks-run"
    _cli("cache", cfg, "--out", st)
    monkeypatch.setenv("DBCORE_MIRROR", str(tmp_path / "other-machine"))
    with store.writer_lock(f"{run}/block0", breakable=False):  # block 0 in training elsewhere
        r = CliRunner().invoke(main, ["train", str(cfg), "--store", st, "--out", run, "--block", "0",
                                      "--quiet"])
    assert r.exit_code == 1 and "another process" in r.output and "block0" in r.output, r.output
    assert "--break-lock" not in r.output and "Traceback" not in r.output
    _cli("train", cfg, "--store", st, "--out", run, "--block", "0", "--quiet")  # released: trains
    assert not any(k.endswith(".lock") for k in s3fs.S3FileSystem().find(f"{BUCKET}/locks-run"))


def test_a_cache_killed_before_its_first_record_resumes_on_s3(s3, tmp_path):
    from dbcore import api
    from dbcore.data import cache as cache_mod
    from dbcore.data.sources import load_source_for

    cfg = api.config(str(_toml(tmp_path)))
    url = f"{s3}/killed.zarr"
    plan = cache_mod.plan_cache(cfg, load_source_for(cfg, "digits:train"), "online", 1, 0, None)
    store.create(url, attrs=plan.attrs)  # what a kill right after creating the store leaves
    r = CliRunner().invoke(main, ["train", str(_toml(tmp_path)), "--store", url, "--out",
                                  str(tmp_path / "r"), "--quiet"])
    assert r.exit_code == 1 and "run the command that wrote it again" in r.output, r.output
    assert "require_complete" not in r.output
    _cli("cache", _toml(tmp_path), "--out", url)  # the same command resumes it
    assert store.open(url).complete


def _toml(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TOML)
    return cfg


def test_a_checkpoint_is_uploaded_tensors_first_and_json_last(s3, tmp_path, monkeypatch):
    import torch

    from dbcore.runs import checkpoint

    order = []
    real = mirror.Mirror._put

    def spy(self, path, rel):
        order.append(rel)
        return real(self, path, rel)

    monkeypatch.setattr(mirror.Mirror, "_put", spy)
    with mirror.local_run(f"{s3}/ckpt") as local:
        checkpoint.save(local / "m", {"w": torch.ones(3)}, {"step": 1})
    assert order == ["m.safetensors", "m.json"]
    with mirror.local_run(f"{s3}/ckpt") as local:  # a fresh mirror reads it back
        tensors, meta = checkpoint.load(local / "m")
    assert torch.equal(tensors["w"], torch.ones(3)) and meta["step"] == 1


def test_s3_errors_are_one_line(s3, tmp_path, monkeypatch):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TOML)
    r = CliRunner().invoke(main, ["cache", str(cfg), "--out", "s3://no-such-bucket-here/c.zarr"])
    assert r.exit_code == 1 and "no-such-bucket-here" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["info", f"{s3}/nothing.zarr"])
    assert r.exit_code == 1 and f"{s3}/nothing.zarr" in r.output
    r = CliRunner().invoke(main, ["eval", "s3://bucket-only"])
    assert r.exit_code == 1 and "prefix" in r.output
    monkeypatch.setitem(__import__("sys").modules, "s3fs", None)  # the s3 extra not installed
    r = CliRunner().invoke(main, ["eval", f"{s3}/run"])
    assert r.exit_code == 1 and "pip install 'dbcore[s3]'" in r.output


def test_text_corpora_stream_from_s3(s3, tmp_path):
    from dbcore.data.text import load_text
    from dbcore.errors import SourceError

    fs = s3fs.S3FileSystem()
    docs = ["first document", "second — document", "third"]
    fs.pipe(f"{s3}/corpus/b.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs[1:]).encode())
    fs.pipe(f"{s3}/corpus/a.jsonl", (json.dumps({"text": docs[0]}) + "\n").encode())
    fs.pipe(f"{s3}/corpus/plain.txt", b"one file of text\n")
    src = load_text(f"jsonl:{s3}/corpus/*.jsonl", "bpe:270")
    ids = src.tokens.astype(np.int64)
    assert src.num_documents == 3 and src.tokenizer.decode(ids).split("<|endoftext|>") == docs
    assert load_text(f"text:{s3}/corpus/plain.txt").tokenizer.decode(
        load_text(f"text:{s3}/corpus/plain.txt").tokens) == "one file of text\n"
    with pytest.raises(SourceError, match="matches no file"):
        load_text(f"jsonl:{s3}/corpus/*.parquet")


def test_ray_trains_blocks_from_and_into_s3(s3, tmp_path):
    ray = pytest.importorskip("ray")
    import torch

    from dbcore import config as config_mod
    from dbcore.runs import checkpoint
    from dbcore.runs.distributed import train_blocks_on_ray
    from dbcore.runs.train import train_run

    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(TOML)
    cfg = config_mod.load(cfg_path)
    _cli("cache", cfg_path, "--out", f"{s3}/ray.zarr")
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_REGION", "DBCORE_MIRROR")}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False,
             runtime_env={"env_vars": env})
    try:
        results = train_blocks_on_ray(cfg, f"{s3}/ray.zarr", f"{s3}/ray_run", progress=False,
                                      echo=lambda r: None)
    finally:
        ray.shutdown()
    assert [r["name"] for r in results] == ["block0", "block1"]
    train_run(cfg, f"{s3}/ray.zarr", tmp_path / "serial", progress=False)
    with mirror.local_run(f"{s3}/ray_run") as run:
        for b in range(2):
            a, _ = checkpoint.load(run / f"block{b}", prefix="model.")
            s, _ = checkpoint.load(tmp_path / f"serial/block{b}", prefix="model.")
            assert all(torch.equal(a[k], s[k]) for k in a), b  # the same weights as in turn, locally


def test_image_shards_and_folders_stream_from_s3(s3, tmp_path):
    import io
    import tarfile

    from PIL import Image

    from dbcore.data.decode import ImageFormat
    from dbcore.data.sources import load_source

    fs = s3fs.S3FileSystem()
    px = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    pngs = []
    for x in px:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for i, data in enumerate(pngs):
            for name, blob in ((f"{i:03d}.png", data), (f"{i:03d}.cls", str(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    fs.pipe(f"{s3}/images/shard-00000.tar", shard.getvalue())
    for i, data in enumerate(pngs):
        fs.pipe(f"{s3}/images/folder/{'ab'[i // 2]}/{i}.png", data)
    fmt = ImageFormat(8, 3, 3)
    src = load_source(f"tar:{s3}/images/shard-{{00000..00000}}.tar", image=fmt)
    np.testing.assert_array_equal(src.images, px)
    assert src.labels.tolist() == [0, 1, 2]
    src = load_source(f"folder:{s3}/images/folder", image=fmt)
    np.testing.assert_array_equal(src.images, px)
    assert src.labels.tolist() == [0, 0, 1] and src.classes == ("a", "b")
