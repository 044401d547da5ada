"""Blocks as Ray tasks: every block trained once, finished blocks skipped, interrupted ones
resumed, the same weights as training in turn, and clear errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dbcore import config as config_mod
from dbcore.cli import main
from dbcore.data import store
from dbcore.data.cache import write_cache
from dbcore.data.sources import load_source
from dbcore.runs import checkpoint
from dbcore.runs.train import train_run

ray = pytest.importorskip("ray")

TOML = """
[model]
image_size = 8
channels = 1
patch_size = 4
dim = 32
depth = 3
heads = 2
mlp_ratio = 2.0
num_blocks = 3

[train]
steps = 12
batch_size = 32
warmup_steps = 2
checkpoint_every = 5
threads = 1
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def setup(tmp_path):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(TOML)
    write_cache(config_mod.load(cfg_path), load_source("digits:train"), tmp_path / "c.zarr", progress=False)
    return cfg_path, tmp_path / "c.zarr"


def _train(cfg_path, store, out, *extra):
    args = ["train", str(cfg_path), "--store", str(store), "--out", str(out), "--quiet", "--ray", *extra]
    return CliRunner().invoke(main, args)


def _lines(output):
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_ray_trains_every_block_as_in_turn_then_skips_finished_ones(local_ray, setup, tmp_path):
    cfg_path, store = setup
    r = _train(cfg_path, store, tmp_path / "ray")
    assert r.exit_code == 0, r.output
    assert sorted(x["name"] for x in _lines(r.output)) == ["block0", "block1", "block2"]
    train_run(config_mod.load(cfg_path), store, tmp_path / "serial", progress=False)
    for b in range(3):
        a, _ = checkpoint.load(tmp_path / f"ray/block{b}", prefix="model.")
        s, _ = checkpoint.load(tmp_path / f"serial/block{b}", prefix="model.")
        assert all(torch.equal(a[k], s[k]) for k in a), b  # the same training, anywhere
    again = _train(cfg_path, store, tmp_path / "ray")
    assert again.exit_code == 0 and _lines(again.output) == []  # nothing left to train


def test_ray_resumes_an_interrupted_block_and_trains_only_the_rest(local_ray, setup, tmp_path,
                                                                 interrupted_at_step):
    cfg_path, store = setup
    cfg = config_mod.load(cfg_path)
    train_run(cfg, store, tmp_path / "run", block=2, progress=False)  # finished
    with interrupted_at_step(8):
        train_run(cfg, store, tmp_path / "run", block=0, progress=False)  # checkpoint at step 5
    r = _train(cfg_path, store, tmp_path / "run")
    assert r.exit_code == 0, r.output
    results = {x["name"]: x for x in _lines(r.output)}
    assert set(results) == {"block0", "block1"}
    assert results["block0"]["resumed_at"] == 5 and results["block1"]["resumed_at"] == 0
    train_run(cfg, store, tmp_path / "serial", block=0, progress=False)
    a, _ = checkpoint.load(tmp_path / "run/block0", prefix="model.")
    s, _ = checkpoint.load(tmp_path / "serial/block0", prefix="model.")
    assert all(torch.equal(a[k], s[k]) for k in a)  # resumed bit-identical inside the task


def test_ray_errors_are_one_line(local_ray, setup, tmp_path, monkeypatch):
    cfg_path, store = setup
    r = _train(cfg_path, store, tmp_path / "x", "--e2e")
    assert r.exit_code == 1 and "--ray trains the blocks" in r.output
    r = _train(cfg_path, store, tmp_path / "x", "--block", "7")
    assert r.exit_code == 1 and "outside 0..2" in r.output
    r = _train(cfg_path, store, tmp_path / "x", "--mode", "sequential")
    assert r.exit_code == 1 and "independently" in r.output
    r = _train(cfg_path, store, tmp_path / "x", "--cpus-per-block", "-1")
    assert r.exit_code == 1 and "ray_cpus" in r.output
    r = CliRunner().invoke(main, ["train", str(cfg_path), "--store", str(store), "--out", str(tmp_path / "y"),
                                  "--address", "auto"])
    assert r.exit_code == 1 and "--address needs --ray" in r.output
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    r = _train(cfg_path, store, tmp_path / "x")
    assert r.exit_code == 1 and "pip install 'dbcore[ray]'" in r.output and "Traceback" not in r.output


def test_a_killed_worker_loses_only_the_steps_since_its_checkpoint(local_ray, tmp_path):
    import os
    import signal
    import subprocess
    import threading
    import time

    from dbcore.runs.distributed import train_blocks_on_ray

    cfg_path = tmp_path / "long.toml"
    cfg_path.write_text(TOML.replace("steps = 12", "steps = 400").replace("checkpoint_every = 5",
                                                                          "checkpoint_every = 20"))
    store = tmp_path / "c.zarr"
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), store, progress=False)
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(
        train_blocks_on_ray(cfg, store, tmp_path / "ray", progress=False, echo=lambda r: None)))
    thread.start()
    meta = tmp_path / "ray/block0.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # block 0 has a checkpoint and is still training
        if meta.is_file() and 0 < json.loads(meta.read_text())["step"] < 400:
            break
        time.sleep(0.05)
    found = subprocess.run(["pgrep", "-f", "ray::dbcore-block0"], capture_output=True, text=True)
    pids = found.stdout.split()
    assert pids, "no block task is running"
    os.kill(int(pids[0]), signal.SIGKILL)  # a worker dies mid-run: Ray retries its task
    thread.join(timeout=300)
    assert not thread.is_alive() and len(results) == 3
    assert results[0]["resumed_at"] > 0  # block 0's task resumed from its last checkpoint
    assert all(r["resumed_at"] % 20 == 0 for r in results)
    train_run(cfg, store, tmp_path / "serial", progress=False)
    for b in range(3):
        a, _ = checkpoint.load(tmp_path / f"ray/block{b}", prefix="model.")
        s, _ = checkpoint.load(tmp_path / f"serial/block{b}", prefix="model.")
        assert all(torch.equal(a[k], s[k]) for k in a), b  # bit for bit as if never interrupted


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small_units(monkeypatch):
    from dbcore.data import cache as cache_mod

    monkeypatch.setattr(cache_mod, "WRITE_TARGET_BYTES", 1)  # a write unit per shard or chunk
    monkeypatch.setattr(cache_mod, "ROWS_PER_WRITE", 256)  # 6 chunks per noise array of digits:train


def test_cache_on_ray_writes_the_bytes_of_a_single_process_cache(local_ray, small_units, tmp_path):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(TOML)
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "one.zarr", noise="cached", draws=2, seed=3,
                progress=False)
    r = CliRunner().invoke(main, ["cache", str(cfg_path), "--out", str(tmp_path / "ray.zarr"), "--noise",
                                  "cached", "--draws", "2", "--seed", "3", "--ray", "--tasks", "3"])
    assert r.exit_code == 0, r.output
    one, many = _files(tmp_path / "one.zarr"), _files(tmp_path / "ray.zarr")
    assert len(one) > 20 and one.keys() == many.keys()
    assert all(one[k] == many[k] for k in one)  # every chunk, shard and metadata file, byte for byte


def test_cache_on_ray_resumes_an_interrupted_cache(local_ray, small_units, tmp_path, monkeypatch,
                                                   interrupted_at_write):
    from dbcore.data import cache as cache_mod
    from dbcore.runs import distributed

    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(TOML)
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "one.zarr", noise="cached", draws=1,
                progress=False)
    with interrupted_at_write(10):
        write_cache(cfg, load_source("digits:train"), tmp_path / "c.zarr", noise="cached", draws=1,
                    progress=False)
    finished = (tmp_path / "c.zarr" / cache_mod.LEDGER).read_text().splitlines()
    split = distributed.split_units
    sent = []
    monkeypatch.setattr(distributed, "split_units", lambda units, n: sent.extend(units) or split(units, n))
    distributed.cache_on_ray(cfg, "digits:train", tmp_path / "c.zarr", noise="cached", draws=1, tasks=2,
                             progress=False)
    assert 5 <= len(finished) and sent and not {(n, a) for n, a, _ in sent} & {
        (line.rsplit(" ", 1)[0], int(line.rsplit(" ", 1)[1])) for line in finished}  # not redone
    one, resumed = _files(tmp_path / "one.zarr"), _files(tmp_path / "c.zarr")
    assert one.keys() == resumed.keys() and all(one[k] == resumed[k] for k in one)


def test_split_units_keeps_order_and_balances_rows():
    from dbcore.runs.distributed import split_units

    units = [("a", i * 10, i * 10 + 10) for i in range(9)] + [("b", 0, 5)]
    runs = split_units(units, 3)
    assert [u for run in runs for u in run] == units and len(runs) == 3
    assert max(sum(b - a for _, a, b in run) for run in runs) <= 40
    assert split_units(units, 100) == [[u] for u in units] and split_units([], 4) == []


def test_cache_ray_errors_are_one_line(tmp_path, monkeypatch):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(TOML)
    out = str(tmp_path / "c.zarr")
    r = CliRunner().invoke(main, ["cache", str(cfg_path), "--out", out, "--tasks", "2"])
    assert r.exit_code == 1 and "--tasks need --ray" in r.output
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    r = CliRunner().invoke(main, ["cache", str(cfg_path), "--out", out, "--ray"])
    assert r.exit_code == 1 and "pip install 'dbcore[ray]'" in r.output and "Traceback" not in r.output


def test_the_api_caches_and_trains_on_ray(local_ray, tmp_path):
    from dbcore import api

    (tmp_path / "tiny.toml").write_text(TOML)
    cfg = api.config(tmp_path / "tiny.toml")
    store = api.cache(cfg, "digits:train", tmp_path / "c.zarr", ray=True, tasks=2)
    api.cache(cfg, "digits:train", tmp_path / "one.zarr")
    one, many = _files(tmp_path / "one.zarr"), _files(store)
    assert one.keys() == many.keys() and all(one[k] == many[k] for k in one)
    with pytest.raises(TypeError, match="source spec"):
        api.cache(cfg, {"images": [[[0]]], "labels": [0]}, tmp_path / "d.zarr", ray=True)
    results = api.train(cfg, store, tmp_path / "run", ray=True, steps=4)
    assert [r["name"] for r in results] == ["block0", "block1", "block2"]
    assert all(r.get("skipped") == "finished"
               for r in api.train(cfg, store, tmp_path / "run", ray=True, steps=4))
    with pytest.raises(ValueError, match="baseline"):
        api.train(cfg, store, tmp_path / "e2e", ray=True, e2e=True)


def test_a_block_spanning_two_workers_trains_what_one_process_trains(local_ray, setup, tmp_path):
    """`--workers-per-block 2`: the block's task runs torchrun with 2 processes (gloo), which
    train it data-parallel at the same global batch."""
    cfg_path, store = setup
    r = _train(cfg_path, store, tmp_path / "ray", "--block", "1", "--workers-per-block", "2")
    assert r.exit_code == 0, r.output
    (result,) = _lines(r.output)
    assert result["name"] == "block1" and result["steps"] == 12
    train_run(config_mod.load(cfg_path), store, tmp_path / "one", block=1, progress=False)
    a, _ = checkpoint.load(tmp_path / "ray/block1", prefix="model.")
    b, _ = checkpoint.load(tmp_path / "one/block1", prefix="model.")
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
    assert worst < 1e-3, worst
    meta = checkpoint.load_meta(tmp_path / "ray/block1")
    assert meta["stream"]["world_size"] == 2
    args = ["train", str(cfg_path), "--store", str(store), "--out", str(tmp_path / "x"),
            "--workers-per-block", "2"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code != 0 and "--workers-per-block needs --ray (without Ray: torchrun)" in out.output


def test_cache_on_ray_of_tar_shards_writes_the_bytes_of_a_single_process_cache(local_ray, small_units,
                                                                                tmp_path):
    import io
    import tarfile

    from PIL import Image

    px = np.random.default_rng(0).integers(0, 256, (300, 8, 8), dtype=np.uint8)
    for shard in range(3):
        with tarfile.open(tmp_path / f"s-{shard}.tar", "w") as tar:
            for i in range(shard * 100, shard * 100 + 100):
                buf = io.BytesIO()
                Image.fromarray(px[i]).save(buf, format="PNG")
                for name, blob in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(TOML)
    spec = f"tar:{tmp_path}/s-*.tar"
    for out, extra in (("one.zarr", []), ("ray.zarr", ["--ray", "--tasks", "3"])):
        r = CliRunner().invoke(main, ["cache", str(cfg_path), "--data", spec, "--out", str(tmp_path / out),
                                      *extra])
        assert r.exit_code == 0, r.output
    one, many = _files(tmp_path / "one.zarr"), _files(tmp_path / "ray.zarr")
    assert one.keys() == many.keys() and all(one[k] == many[k] for k in one)
    np.testing.assert_array_equal(store.open(tmp_path / "ray.zarr").read("images")[..., 0], px)
