"""The Python API (`dbcore.api`): batches from a generator or a DataLoader cache the same store as an
in-memory source, bad batches are clear SourceErrors, the spill folder is always removed, and
cache -> train -> evaluate -> sample runs without the CLI; the example script runs."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dbcore import api
from dbcore.data import store
from dbcore.data.sources import Source, load_source
from dbcore.data.store import StoreError
from dbcore.errors import ConfigError, RunError, SourceError
from dbcore.method import layout

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = {
    "model": {"recipe": "vit", "image_size": 8, "channels": 1, "patch_size": 4, "dim": 32, "depth": 2,
              "heads": 2, "mlp_ratio": 2.0, "num_blocks": 2},
    "train": {"steps": 12, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 5},
}
DIT = {
    "model": {"recipe": "dit", "image_size": 8, "channels": 1, "patch_size": 4, "dim": 32, "depth": 2,
              "heads": 2, "mlp_ratio": 2.0, "num_blocks": 2, "sample_steps": 2},
    "train": {"steps": 12, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 5, "weight": "edm"},
}
TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n") * 12
ARLM = {"model": {"recipe": "arlm", "seq_len": 16, "dim": 32, "depth": 2, "heads": 2, "num_blocks": 2},
        "train": {"steps": 12, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 5}}


def batches(source: Source, sizes, squeeze=False):
    """The rows of `source` in batches of the given sizes (cycled), as a pipeline would yield them."""
    a, i = 0, 0
    while a < len(source.labels):
        b = min(a + sizes[i % len(sizes)], len(source.labels))
        images = source.images[a:b]
        yield {"images": images[..., 0] if squeeze and i % 2 else images, "labels": source.labels[a:b]}
        a, i = b, i + 1


def read_store(path):
    s = store.open(path)
    return s, {name: s.read(name) for name in (layout.IMAGES, layout.LABELS, layout.TARGET_EMBEDDING)}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".spill-" in p.name or ".eval-" in p.name)


# ----------------------------------------------------------------------------- config


def test_config_from_a_dict_and_from_toml_agree(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\nrecipe = "vit"\npatch_size = 4\ndim = 32\ndepth = 2\nheads = 2\n'
                    "mlp_ratio = 2.0\n[train]\nsteps = 12\nbatch_size = 32\nwarmup_steps = 2\n"
                    "checkpoint_every = 5\n")
    d = copy.deepcopy(VIT)
    assert api.config(d).to_dict() == api.config(toml).to_dict() == api.config(str(toml)).to_dict()
    assert d == VIT  # the caller's dict is left alone
    with pytest.raises(ConfigError, match="unknown key"):
        api.config({"model": {"recipe": "vit", "dimm": 3}})
    with pytest.raises(ConfigError, match="not found"):
        api.config(tmp_path / "missing.toml")
    with pytest.raises(TypeError):
        api.config(3)


# ----------------------------------------------------------------------------- cache from batches


def test_generator_of_batches_caches_the_same_store_as_the_source(tmp_path, monkeypatch):
    from dbcore.data import cache as cache_mod

    cfg = api.config(VIT)
    src = load_source("digits:train")
    seen = {}
    real = cache_mod.write_cache

    def spy(cfg, source, out, **kw):  # the rows reach write_cache as memmaps in a folder next to out
        seen["images"], seen["labels"] = source.images, source.labels
        seen["folder"] = Path(source.images.filename).parent
        return real(cfg, source, out, **kw)

    monkeypatch.setattr(cache_mod, "write_cache", spy)
    out = api.cache(cfg, batches(src, [100, 0, 37, 300], squeeze=True), tmp_path / "g" / "gen.zarr")
    assert out == tmp_path / "g" / "gen.zarr"
    assert isinstance(seen["images"], np.memmap) and isinstance(seen["labels"], np.memmap)
    assert seen["folder"].parent == tmp_path / "g" and seen["folder"].name.startswith(".gen.zarr.spill-")
    assert not seen["folder"].exists() and leftovers(tmp_path / "g") == []
    monkeypatch.setattr(cache_mod, "write_cache", real)

    api.cache(cfg, src, tmp_path / "mem.zarr")
    s_gen, gen = read_store(out)
    s_mem, mem = read_store(tmp_path / "mem.zarr")
    for name in gen:
        assert gen[name].dtype == mem[name].dtype and np.array_equal(gen[name], mem[name]), name
    assert s_gen.attrs["source"]["spec"] == "iterable"
    assert s_gen.attrs["source"]["sha256"] == s_mem.attrs["source"]["sha256"] == src.sha256()
    assert s_gen.attrs["source"]["num_samples"] == len(src.labels) == 1437


def test_torch_dataloader_of_dict_batches(tmp_path):
    cfg = api.config(VIT)
    src = load_source("digits:train")
    rows = Source("first", src.images[:300], src.labels[:300])

    class Digits(torch.utils.data.Dataset):
        def __len__(self):
            return 300

        def __getitem__(self, i):
            return {"images": torch.from_numpy(rows.images[i]), "labels": int(rows.labels[i])}

    loader = torch.utils.data.DataLoader(Digits(), batch_size=64)
    api.cache(cfg, loader, tmp_path / "dl.zarr")
    api.cache(cfg, rows, tmp_path / "mem.zarr")
    _, a = read_store(tmp_path / "dl.zarr")
    _, b = read_store(tmp_path / "mem.zarr")
    assert all(np.array_equal(a[k], b[k]) for k in a) and len(a[layout.LABELS]) == 300
    # one dict of arrays is one batch
    api.cache(cfg, {"images": rows.images, "labels": rows.labels}, tmp_path / "one.zarr")
    _, c = read_store(tmp_path / "one.zarr")
    assert all(np.array_equal(c[k], b[k]) for k in c)
    assert leftovers(tmp_path) == []


GOOD = {"images": np.zeros((4, 8, 8), np.uint8), "labels": np.arange(4)}
BAD = [
    ({"images": GOOD["images"]}, "batch 2: missing field 'labels'"),
    ({**GOOD, "images": GOOD["images"].astype(np.float32)}, "batch 2: field 'images' must be uint8"),
    ({**GOOD, "labels": np.zeros(4)}, "batch 2: field 'labels' must be integer (n,), found float64"),
    ({**GOOD, "images": np.zeros((4, 6, 6), np.uint8)}, "batch 2: field 'images' has rows of shape (6, 6"),
    ({**GOOD, "labels": np.array([0, 1, -1, 2])}, "batch 2: field 'labels' must be non-negative, found -1"),
    ({**GOOD, "labels": np.arange(5)}, "batch 2: field 'images' has 4 rows, field 'labels' 5"),
    ([GOOD["images"], GOOD["labels"]], "batch 2: expected a dict with fields 'images' and 'labels'"),
    ("some text", "batch 2: found a str"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_batch_is_a_source_error_naming_batch_and_field(tmp_path, bad, message):
    cfg = api.config(VIT)
    with pytest.raises(SourceError) as exc:
        api.cache(cfg, iter([GOOD, GOOD, bad, GOOD]), tmp_path / "c.zarr")
    assert message in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no spill folder


def test_empty_data_and_wrong_types(tmp_path):
    cfg = api.config(VIT)
    with pytest.raises(SourceError, match=r"no rows \(0 batches\)"):
        api.cache(cfg, iter([]), tmp_path / "c.zarr")
    with pytest.raises(SourceError, match=r"no rows \(2 batches\)"):
        api.cache(cfg, [{"images": np.zeros((0, 8, 8), np.uint8), "labels": np.zeros(0, int)}] * 2,
                  tmp_path / "c.zarr")
    with pytest.raises(TypeError, match="iterable of"):
        api.cache(cfg, 42, tmp_path / "c.zarr")
    with pytest.raises(SourceError, match="unknown data source"):
        api.cache(cfg, "nope:x", tmp_path / "c.zarr")
    assert list(tmp_path.iterdir()) == []


def test_spill_folder_is_removed_when_write_cache_fails(tmp_path):
    cfg = api.config({**VIT, "model": {**VIT["model"], "image_size": 16}})  # the digits are 8x8
    src = load_source("digits:valid")
    with pytest.raises(ValueError, match="the config expects 16x16x1"):
        api.cache(cfg, batches(src, [128]), tmp_path / "c.zarr")
    assert leftovers(tmp_path) == []
    api.cache(api.config(VIT), batches(src, [128]), tmp_path / "c.zarr")
    with pytest.raises(StoreError, match="already exists"):  # typed library errors pass through
        api.cache(api.config(VIT), batches(src, [128]), tmp_path / "c.zarr")
    assert leftovers(tmp_path) == []
    api.cache(api.config(VIT), batches(src, [128]), tmp_path / "c.zarr", overwrite=True)


# ----------------------------------------------------------------------------- the whole loop


def test_vit_cache_train_evaluate_through_the_api(tmp_path):
    cfg = api.config(VIT)
    before = copy.deepcopy(cfg.to_dict())
    store_path = api.cache(cfg, batches(load_source("digits:train"), [256]), tmp_path / "c.zarr")
    results = api.train(cfg, store_path, tmp_path / "db", steps=3)
    assert [r["name"] for r in results] == ["block0", "block1"] and all(r["steps"] == 3 for r in results)
    assert cfg.to_dict() == before and cfg.train.steps == 12  # the caller's config is untouched
    run_json = json.loads((tmp_path / "db/run.json").read_text())
    assert run_json["config"]["train"]["steps"] == 3
    (e2e,) = api.train(cfg, store_path, tmp_path / "e2e", e2e=True, steps=3)
    assert e2e["name"] == "e2e"
    with pytest.raises(ValueError, match="steps must be >= 1"):
        api.train(cfg, store_path, tmp_path / "x", steps=0)
    with pytest.raises(StoreError, match="shuffle window of .* fewer than one"):
        api.train(cfg, store_path, tmp_path / "x", shuffle_window_mb=0.001)
    with pytest.raises(ConfigError, match="shuffle_window_mb must be >= 0"):
        api.train(cfg, store_path, tmp_path / "x", shuffle_window_mb=-1)
    assert cfg.train.shuffle_window_mb == 0  # the overrides are the call's alone

    r = api.evaluate(tmp_path / "db", "digits:valid", decode="product")
    assert r["kind"] == "blocks" and r["num_samples"] == 360 and 0 <= r["accuracy"] <= 1
    assert r["decode"] == "product"
    valid = load_source("digits:valid")
    same = api.evaluate(tmp_path / "db", batches(valid, [100]), decode="product")
    assert same["data"] == "iterable" and same["accuracy"] == r["accuracy"] and same["loss"] == r["loss"]
    assert api.evaluate(tmp_path / "e2e", valid)["kind"] == "e2e"
    assert leftovers(tmp_path) == []

    with pytest.raises(RunError, match="does not generate"):
        api.sample_images(tmp_path / "db", num=2)
    with pytest.raises(RunError, match="does not generate text"):
        api.sample_text(tmp_path / "db")
    dit = api.config(DIT)  # a store of another recipe
    with pytest.raises(RunError, match="cached for recipe 'vit'"):
        api.train(dit, store_path, tmp_path / "wrong", steps=1)


def test_dit_samples_through_the_api(tmp_path):
    cfg = api.config(DIT)
    store_path = api.cache(cfg, "digits:train", tmp_path / "c.zarr")
    api.train(cfg, store_path, tmp_path / "db", steps=3)
    images = api.sample_images(tmp_path / "db", num=4, steps=2, seed=1)
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert np.array_equal(images, api.sample_images(tmp_path / "db", num=4, steps=2, seed=1))
    one = api.sample_images(tmp_path / "db", num=2, label=3, steps=2, sampler="heun", cfg_scale=1.5)
    assert one.shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="num must be >= 1"):
        api.sample_images(tmp_path / "db", num=0)
    with pytest.raises(ValueError, match="outside 0..9"):
        api.sample_images(tmp_path / "db", num=2, label=12)


def test_text_cache_train_evaluate_sample_through_the_api(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    cfg = api.config(ARLM)
    store_path = api.cache(cfg, f"text:{text}", tmp_path / "c.zarr")
    api.train(cfg, store_path, tmp_path / "ar", steps=3)
    r = api.evaluate(tmp_path / "ar", f"text:{text}", num_samples=4)
    assert r["num_windows"] == 4 and r["bpc"] > 0
    texts = api.sample_text(tmp_path / "ar", num=2, length=12, prompt="To", seed=0)
    assert len(texts) == 2 and all(len(t) == 12 and t.startswith("To") for t in texts)
    with pytest.raises(SourceError, match="found a str"):
        api.cache(cfg, iter(["To be", "or not"]), tmp_path / "t.zarr")


# ----------------------------------------------------------------------------- the example


def test_example_script_runs(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "api_example.py"
    spec = importlib.util.spec_from_file_location("api_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(steps=2, out=tmp_path)
    assert report["kind"] == "blocks" and report["num_samples"] == 360
    assert "accuracy" in capsys.readouterr().out
