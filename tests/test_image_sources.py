"""Images as users keep them: WebDataset tar shards, class folders and Parquet files, decoded in
parallel to the config's size and channels, and one clear line for each kind of bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dbcore.data import store
from dbcore.data.decode import ImageFormat, decode
from dbcore.data.sources import load_source
from dbcore.errors import SourceError

CIFAR_VALID = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10" / "valid-00000.tar"


def _pixels(n: int, size: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                _add(tar, key + suffix, data)
    return path


def _png_samples(pixels: np.ndarray, labels: list[int], start: int = 0, json_label: bool = False):
    out = []
    for i, (x, y) in enumerate(zip(pixels, labels, strict=True)):
        label = {".json": json.dumps({"label": y}).encode()} if json_label else {".cls": str(y).encode()}
        out.append((f"{start + i:06d}", {".png": _encoded(x, "PNG"), **label}))
    return out


def test_tar_shards_decode_to_the_exact_pixels_in_shard_and_key_order(tmp_path):
    px = _pixels(7)
    _shard(tmp_path / "train-00001.tar", _png_samples(px[4:], [4, 5, 6], start=4, json_label=True))
    _shard(tmp_path / "train-00000.tar", _png_samples(px[:4], [0, 1, 2, 3]))
    for spec in (f"tar:{tmp_path}/train-*.tar", f"tar:{tmp_path}/train-{{00000..00001}}.tar"):
        src = load_source(spec, image=ImageFormat(12, 3, 10))
        np.testing.assert_array_equal(src.images, px)  # PNG is lossless
        assert src.labels.tolist() == list(range(7)) and src.images.dtype == np.uint8


def _smooth(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    channels = [x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)]
    return np.stack(channels, -1).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_tar_source_resizes_and_converts_as_documented(tmp_path, channels):
    wide = _smooth(40, 66)  # H 40, W 66: shorter side to 10, W 16.5 -> 17, crop offset 3
    _shard(tmp_path / "s.tar", [("a", {".png": _encoded(wide, "PNG"), ".cls": b"1"})])
    src = load_source(f"tar:{tmp_path}/s.tar", image=ImageFormat(10, channels, 2))
    im = Image.fromarray(wide).convert("L" if channels == 1 else "RGB")
    expect = np.asarray(im.resize((17, 10), Image.Resampling.BICUBIC, reducing_gap=None).crop((3, 0, 13, 10)))
    assert src.images.shape == (1, 10, 10, channels)
    diff = np.abs(src.images[0].astype(int) - expect.reshape(10, 10, channels))
    assert diff.max() <= 2, diff.max()  # the extension's bicubic against Pillow's: rounding only


def test_jpeg_and_webp_decode_close_to_their_pixels_and_to_pillow():
    from dbcore.data.decode import decode_batches
    from dbcore.data.image_records import Record

    smooth = _smooth(16, 16)
    for fmt in ("JPEG", "WEBP"):
        data = _encoded(smooth, fmt)
        (rows, _), = decode_batches([Record(data, 0, "x")], ImageFormat(16, 3))  # the extension
        pillow = decode(data, "x", ImageFormat(16, 3))
        assert rows.shape == (1, 16, 16, 3) and np.abs(rows[0].astype(int) - smooth).mean() < 4, fmt
        assert np.abs(rows[0].astype(int) - pillow).mean() < 1, fmt


def test_class_folders_take_labels_from_sorted_names_and_keep_the_names(tmp_path):
    px = _pixels(5)
    for name, rows in (("dog", [3, 4]), ("cat", [0, 1, 2])):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in rows:
            Image.fromarray(px[i]).save(tmp_path / "data" / name / f"img{i}.png")
    (tmp_path / "data" / "notes.txt").write_text("not a class")
    src = load_source(f"folder:{tmp_path}/data", image=ImageFormat(12, 3, 2))
    assert src.classes == ("cat", "dog") and src.labels.tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(src.images, px)


def _parquet(path: Path, pixels: np.ndarray, labels: list[int], struct: bool = True,
             names: tuple[str, str] = ("image", "label")) -> Path:
    data = [_encoded(x, "PNG") for x in pixels]
    if struct:
        images = pa.array([{"bytes": d, "path": f"{i}.png"} for i, d in enumerate(data)])
    else:
        images = pa.array(data, pa.binary())
    pq.write_table(pa.table({names[0]: images, names[1]: pa.array(labels, pa.int64())}), path)
    return path


def test_parquet_in_the_datasets_layout_and_with_named_columns(tmp_path):
    px = _pixels(4)
    _parquet(tmp_path / "a.parquet", px[:2], [1, 0])
    _parquet(tmp_path / "b.parquet", px[2:], [3, 2])
    src = load_source(f"parquet:{tmp_path}/*.parquet", image=ImageFormat(12, 3, 4))
    np.testing.assert_array_equal(src.images, px)
    assert src.labels.tolist() == [1, 0, 3, 2]
    _parquet(tmp_path / "c.parquet", px, [0, 1, 2, 3], struct=False, names=("img", "fine"))
    src = load_source(f"parquet:{tmp_path}/c.parquet#img,fine", image=ImageFormat(12, 3, 4))
    np.testing.assert_array_equal(src.images, px)


@pytest.mark.parametrize("case, match", [
    ("nothing", "matches no file"),
    ("corrupt", r"train\.tar: sample '000001': not a readable image"),
    ("no label", r"sample '000000': no label"),
    ("bad cls", r"sample '000000': \.cls must hold a non-negative integer"),
    ("out of range", r"sample '000001': label 7 is out of range: the config has num_classes 3"),
    ("no image", r"sample '000000': no image member"),
    ("empty folder", r"data/cat: class folder holds no image"),
    ("no column", r"a\.parquet: no column 'image'"),
    ("not a shard", r"bad\.tar: not a readable tar shard"),
])
def test_bad_image_sources_get_one_line_naming_file_and_key(tmp_path, case, match):
    px = _pixels(2)
    spec = f"tar:{tmp_path}/train.tar"
    if case == "nothing":
        spec = f"tar:{tmp_path}/nope-*.tar"
    elif case == "corrupt":
        samples = _png_samples(px, [0, 1])
        samples[1][1][".png"] = samples[1][1][".png"][:40]  # truncated
        _shard(tmp_path / "train.tar", samples)
    elif case == "no label":
        _shard(tmp_path / "train.tar", [("000000", {".png": _encoded(px[0], "PNG")})])
    elif case == "bad cls":
        _shard(tmp_path / "train.tar", [("000000", {".png": _encoded(px[0], "PNG"), ".cls": b"cat"})])
    elif case == "out of range":
        _shard(tmp_path / "train.tar", _png_samples(px, [0, 7]))
    elif case == "no image":
        _shard(tmp_path / "train.tar", [("000000", {".cls": b"1"})])
    elif case == "empty folder":
        (tmp_path / "data" / "cat").mkdir(parents=True)
        (tmp_path / "data" / "cat" / "readme.txt").write_text("x")
        spec = f"folder:{tmp_path}/data"
    elif case == "no column":
        _parquet(tmp_path / "a.parquet", px, [0, 1], names=("img", "label"))
        spec = f"parquet:{tmp_path}/a.parquet"
    elif case == "not a shard":
        (tmp_path / "bad.tar").write_bytes(b"\x01" * 1000)
        spec = f"tar:{tmp_path}/bad.tar"
    with pytest.raises(SourceError, match=match) as info:
        np.asarray(load_source(spec, image=ImageFormat(12, 3, 3)).images)  # decoding finds a corrupt one
    assert "\n" not in str(info.value)


def test_without_a_size_images_of_two_sizes_are_refused(tmp_path):
    small, big = _pixels(1, 8)[0], _pixels(1, 12)[0]
    _shard(tmp_path / "s.tar", [("a", {".png": _encoded(small, "PNG"), ".cls": b"0"}),
                                ("b", {".png": _encoded(big, "PNG"), ".cls": b"0"})])
    with pytest.raises(SourceError, match="sample 'b': image is 12x12, the ones before it 8x8"):
        load_source(f"tar:{tmp_path}/s.tar")


def test_rows_decode_on_demand_in_any_range_and_the_digest_follows_the_bytes(tmp_path, monkeypatch):
    from dbcore.data import images as images_mod

    px = _pixels(9)
    _shard(tmp_path / "a-0.tar", _png_samples(px[:4], [0, 1, 2, 0]))
    _shard(tmp_path / "a-1.tar", _png_samples(px[4:], [1, 2, 0, 1, 2], start=4))
    src = load_source(f"tar:{tmp_path}/a-*.tar", image=ImageFormat(12, 3, 3))
    assert src.images.shape == (9, 12, 12, 3) and src.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    for a, b in ((0, 9), (5, 7), (3, 5), (5, 9), (0, 1), (8, 9)):  # across shards, resumed or not
        np.testing.assert_array_equal(src.images[a:b], px[a:b])
    np.testing.assert_array_equal(np.asarray(src.images), px)
    seen: list = []
    real = images_mod.decode_batches
    monkeypatch.setattr(images_mod, "decode_batches", lambda recs, fmt: real(_counted(recs, seen), fmt))
    np.testing.assert_array_equal(src.images[6:8], px[6:8])
    assert len(seen) == 2  # a read decodes its own rows only
    digest = src.sha256()
    assert load_source(f"tar:{tmp_path}/a-*.tar", image=ImageFormat(12, 3, 3)).sha256() == digest
    _shard(tmp_path / "a-1.tar", _png_samples(px[4:], [1, 2, 0, 1, 1], start=4))  # one label changed
    assert load_source(f"tar:{tmp_path}/a-*.tar", image=ImageFormat(12, 3, 3)).sha256() != digest


def _counted(recs, seen):
    for r in recs:
        seen.append(r)
        yield r


def test_the_temporary_rows_are_removed_when_the_source_closes(tmp_path):
    _shard(tmp_path / "s.tar", _png_samples(_pixels(3), [0, 1, 2]))
    src = load_source(f"tar:{tmp_path}/s.tar")  # no size: decoded whole, into a temporary folder
    folder = Path(src.images.filename).parent
    assert folder.is_dir()
    src.close()
    assert not folder.exists()


def test_cache_cli_writes_a_folder_source_with_its_class_names(tmp_path):
    from click.testing import CliRunner

    from dbcore.cli import main

    px = _pixels(6, 16)
    for name, rows in (("a", [0, 1, 2]), ("b", [3, 4, 5])):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in rows:
            Image.fromarray(px[i]).save(tmp_path / "data" / name / f"{i}.png")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[model]\nrecipe = 'vit'\nimage_size = 8\nchannels = 3\npatch_size = 4\ndim = 16\n"
                   "depth = 2\nheads = 2\nnum_classes = 2\nnum_blocks = 2\n[train]\nsteps = 2\n")
    r = CliRunner().invoke(main, ["cache", str(cfg), "--data", f"folder:{tmp_path}/data",
                                  "--out", str(tmp_path / "c.zarr")])
    assert r.exit_code == 0, r.output
    s = store.open(tmp_path / "c.zarr")
    assert s.read("images").shape == (6, 8, 8, 3) and s.read("labels").tolist() == [0, 0, 0, 1, 1, 1]
    assert s.attrs["source"]["classes"] == ["a", "b"]


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_VALID.is_file(), reason="needs ../shared/datasets/cifar10")
def test_the_cifar_shard_decodes_within_a_grey_level_of_pillow():
    src = load_source(f"tar:{CIFAR_VALID}", image=ImageFormat(32, 3, 10))
    assert src.images.shape == (5000, 32, 32, 3) and set(src.labels.tolist()) == set(range(10))
    with tarfile.open(CIFAR_VALID) as tar:
        jpegs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    pillow = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in jpegs[:500]])
    diff = np.abs(src.images[:500].astype(int) - pillow)  # zune-jpeg against libjpeg-turbo
    assert diff.mean() < 0.5 and (diff <= 1).mean() > 0.9, (diff.mean(), (diff <= 1).mean())  # 0.30, 0.917


def test_api_caches_a_datasets_dataset_as_it_is_with_its_class_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    from dbcore import api

    px = _pixels(6, 16)
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": _encoded(x, "PNG"), "path": None} for x in px], "fine": [0, 1, 2, 1, 0, 2]},
        features=datasets.Features({"img": datasets.Image(),
                                    "fine": datasets.ClassLabel(names=["x", "y", "z"])}))
    cfg = api.config({"model": {"recipe": "vit", "image_size": 8, "channels": 3, "patch_size": 4, "dim": 16,
                                "depth": 2, "heads": 2, "num_classes": 3, "num_blocks": 2}})
    s = store.open(api.cache(cfg, ds, tmp_path / "c.zarr"))
    expect = load_source(f"parquet:{_parquet(tmp_path / 'p.parquet', px, [0, 1, 2, 1, 0, 2])}",
                         image=ImageFormat(8, 3, 3))  # the same pixels, resized the same way
    np.testing.assert_array_equal(s.read("images"), expect.images)
    assert s.read("labels").tolist() == [0, 1, 2, 1, 0, 2] and s.attrs["source"]["classes"] == ["x", "y", "z"]
    assert not [p for p in tmp_path.iterdir() if ".spill" in p.name]  # the spill is gone
    with pytest.raises(SourceError, match="expected one Image column"):
        api.cache(cfg, ds.remove_columns("img"), tmp_path / "d.zarr")


def test_a_corrupt_image_fails_the_cache_in_one_line_and_leaves_it_unfinished(tmp_path):
    from click.testing import CliRunner

    from dbcore.cli import main

    samples = _png_samples(_pixels(3, 8), [0, 1, 0])
    samples[2][1][".png"] = b"\x89PNG broken"
    _shard(tmp_path / "s.tar", samples)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[model]\nrecipe = 'vit'\nimage_size = 8\nchannels = 3\npatch_size = 4\ndim = 16\n"
                   "depth = 2\nheads = 2\nnum_classes = 2\nnum_blocks = 2\n[train]\nsteps = 2\n")
    r = CliRunner().invoke(main, ["cache", str(cfg), "--data", f"tar:{tmp_path}/s.tar", "--out",
                                  str(tmp_path / "c.zarr")])
    assert r.exit_code == 1 and "s.tar: sample '000002': not a readable image" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not store.open(tmp_path / "c.zarr", require_complete=False).complete
