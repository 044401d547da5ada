"""Error wording: the API names its parameters as Python does, the CLI as its options."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dbcore import config as config_mod
from dbcore.cli import main
from dbcore.data import store
from dbcore.data.cache import write_cache
from dbcore.data.sources import load_source
from dbcore.wording import arg, cli_wording

TOML = """
[model]
recipe = "vit"
image_size = 8
patch_size = 4
dim = 32
depth = 2
heads = 2
num_blocks = 2
"""


def test_arg_speaks_api_by_default_and_cli_inside_a_command():
    assert arg("overwrite", True) == "overwrite=True" and arg("block", 7) == "block=7"
    with cli_wording():
        assert arg("overwrite", True) == "--overwrite" and arg("block", 7) == "--block 7"
        assert arg("label", 3) == "--class 3" and arg("frozen_prelude") == "--freeze-prelude"
    assert arg("noise", "cached") == "noise='cached'"


def test_an_existing_store_is_refused_in_each_interface_s_words(tmp_path):
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(TOML)
    cfg = config_mod.load(cfg_path)
    write_cache(cfg, load_source("digits:train"), tmp_path / "s.zarr", progress=False)
    with pytest.raises(store.StoreExistsError) as exc:
        write_cache(cfg, load_source("digits:train"), tmp_path / "s.zarr", progress=False)
    assert "overwrite=True" in str(exc.value) and "--" not in str(exc.value)
    args = ["cache", str(cfg_path), "--data", "digits:train", "--out", str(tmp_path / "s.zarr")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "--overwrite" in r.output and "overwrite=True" not in r.output
