"""Hardening: a full disk during cache and checkpoint writes, two writers on one store."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dbcore.data import store
from dbcore.runs import checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/vit_digits.toml")


def _cli(*args: str, cwd: Path, file_limit: int | None = None) -> subprocess.CompletedProcess:
    """`dbcore ARGS` in a subprocess; `file_limit`: no file may grow past this many bytes, as
    on a full disk (writes fail with EFBIG instead of the process being killed)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "dbcore.cli", *args], cwd=cwd, capture_output=True,
                          text=True, preexec_fn=limit if file_limit else None, timeout=300)


def _one_clear_line(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("Error")]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_full_disk_during_cache_leaves_an_incomplete_store_that_resumes(tmp_path):
    r = _cli("cache", CONFIG, "--data", "digits:train", "--out", "s.zarr", cwd=tmp_path, file_limit=20_000)
    _one_clear_line(r, "File too large")
    with pytest.raises(store.IncompleteStoreError):
        store.open(tmp_path / "s.zarr")
    r = _cli("cache", CONFIG, "--data", "digits:train", "--out", "s.zarr", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert store.open(tmp_path / "s.zarr").attrs["source"]["num_samples"] == 1437


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_training_resumes(tmp_path):
    assert _cli("cache", CONFIG, "--data", "digits:train", "--out", "s.zarr", cwd=tmp_path).returncode == 0
    train = ("train", CONFIG, "--store", "s.zarr", "--out", "run", "--block", "0", "--steps", "30", "--quiet")
    r = _cli(*train, cwd=tmp_path, file_limit=100_000)  # a block checkpoint is larger than this
    _one_clear_line(r, "could not be written")
    assert not checkpoint.exists(tmp_path / "run/block0")
    assert not list((tmp_path / "run").glob("*.tmp"))  # nothing half-written left behind
    r = _cli(*train, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert checkpoint.load_meta(tmp_path / "run/block0")["done"]


def test_a_second_writer_of_a_store_is_refused(tmp_path):
    with store.writer_lock(tmp_path / "s.zarr"):
        r = _cli("cache", CONFIG, "--data", "digits:train", "--out", "s.zarr", cwd=tmp_path)
        _one_clear_line(r, "another process")
    r = _cli("cache", CONFIG, "--data", "digits:train", "--out", "s.zarr", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # released with the holder
