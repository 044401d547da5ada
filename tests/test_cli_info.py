"""`dbcore info STORE [--json]`, through click's runner and the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dbcore.cli import main
from dbcore.data import store


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    s = store.create(tmp_path / "s.zarr", attrs={"model": "vit"})
    s.write_array("images", np.zeros((100, 8, 8), "uint8"), chunks=10, shards=50)
    s.write_array("labels", np.arange(100))
    s.finalize()
    return tmp_path / "s.zarr"


def test_info_table(store_path):
    r = CliRunner().invoke(main, ["info", str(store_path)])
    assert r.exit_code == 0, r.output
    assert "complete" in r.output and "incomplete" not in r.output
    for word in ["images", "(100, 8, 8)", "uint8", "labels", "int64", "zstd", "model"]:
        assert word in r.output


def test_info_json(store_path):
    r = CliRunner().invoke(main, ["info", str(store_path), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["complete"] is True and d["attrs"] == {"model": "vit"}
    a = d["arrays"]["images"]
    assert a["shape"] == [100, 8, 8] and a["chunks"] == [10, 8, 8] and a["shards"] == [50, 8, 8]
    assert a["nbytes"] == 6400 and a["nbytes_stored"] > 0


def test_info_incomplete_and_errors(tmp_path):
    s = store.create(tmp_path / "s.zarr")
    s.write_array("x", np.zeros(3))
    r = CliRunner().invoke(main, ["info", str(tmp_path / "s.zarr"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["complete"] is False
    r = CliRunner().invoke(main, ["info", str(tmp_path / "missing.zarr")])
    assert r.exit_code != 0 and "no such store" in r.output and "Traceback" not in r.output


def test_info_console_script(store_path):
    exe = shutil.which("dbcore") or str(Path(sys.executable).parent / "dbcore")
    out = subprocess.run([exe, "info", str(store_path), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["arrays"]["labels"]["dtype"] == "int64"
