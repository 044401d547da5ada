"""A short run of every recipe trains bit-identical weights release after release: the sha256 of
each trained model's weights, recorded from the code before the package's restructure (session 12),
checks that refactors of the training path change no value (batch order, noise, loss, optimizer).
A deliberate change of the training's numbers updates `EXPECTED` in the same commit, saying why."""

import hashlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from dbcore import api
from dbcore.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = {"steps": 6, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 5, "device": "cpu"}
IMAGE = {"image_size": 8, "channels": 1, "patch_size": 4, "dim": 32, "depth": 2, "heads": 2,
         "mlp_ratio": 2.0, "num_blocks": 2}
TEXT_MODEL = {"seq_len": 16, "dim": 32, "depth": 2, "heads": 2, "num_blocks": 2}
CONFIGS = {
    "vit": {"model": {"recipe": "vit", **IMAGE}, "train": {**TRAIN, "mix_fraction": 0.5}},
    "dit": {"model": {"recipe": "dit", **IMAGE, "sample_steps": 2}, "train": {**TRAIN, "weight": "edm"}},
    "mdlm": {"model": {"recipe": "mdlm", **TEXT_MODEL}, "train": TRAIN},
    "arlm": {"model": {"recipe": "arlm", **TEXT_MODEL}, "train": TRAIN},
    "looped": {"model": {"recipe": "looped", "seq_len": 16, "dim": 32, "heads": 2, "prelude_layers": 1,
                         "core_layers": 1, "coda_layers": 1, "iterations": 4, "train_iterations": 3,
                         "backprop_iterations": 2}, "train": TRAIN},
}
TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 12

# recipe -> {checkpoint: sha256 of its model weights}, recorded before the restructure
EXPECTED: dict[str, dict[str, str]] = {
    "arlm": {
        "block0": "010f81a1870daca8c503ef245b64c549f6833fb4b0c8d572a26d6317838a6631",
        "block1": "0392fd48f6dcd8834c84e62fd1033167e1239faf3b543f390e54e5684503fcca",
        "e2e": "cf2e56ae912278d74d108d877aa6bc2bac9dd71d79f1e3ff749efa7afa339882",
    },
    "dit": {
        "block0": "88168fd071ccec59744107e692e6e29c251fdaaddd8a7fe94f10c6712629559b",
        "block1": "5a50748c3fdb2256c6c2f55d6abe30784382381476c0fc02d9e280008cd1effe",
        "e2e": "188a94c8c1e006e5ce0b370d3cf23d340ecedb2c6555dbfdf6e8960af4482f7e",
    },
    "looped": {
        "block0": "185061345e44519994748e73f6a5e43d09fcb12d3c753945e14a8d19448b3dde",
        "e2e": "bdac801737cbaba46ac3dd839dcec33b9afafc50c3ca4b2e867041ccdc367df6",
        "frozen_prelude_block0": "2d2f44792d61fc03f25ae750a6f76ab6f558772316b20a4c5e0f92820c36351c",
    },
    "mdlm": {
        "block0": "dddbb7fa03f5e3efcb4f2dce3dd01de076beb85b33d1e07fc45c6405e353758b",
        "block1": "d11392714478d56113630e39ea8edcae11f7951bff61b0813a8d414c0fa98028",
        "e2e": "efffb97f99e8f555dc39347ea04ae60bdba14924421bd1a9c433652b4bacdf04",
    },
    "vit": {
        "block0": "6d2fafab288e4c6bdf891126c5eb70011f6ff77a39f42cee8ec1d2790959e4fd",
        "block1": "a2b606407fcd9d29855809c12850cd7a3d06f53d11c2a0a712cadec2a6f81eff",
        "e2e": "3dcdea14f26ede42a0c42fba1c1ed55968d578e2d9166bf33bfd02c74834fd17",
        "sequential_block1": "b79b6b68b8885b0d6f49ba59308141eb6b2f7ca126e1de3816aa96321bbf3c14",
        "paper_shared": "72a23e384b2d71340287f082d9ba5a31c9d7167d34507b4c05ce7fff38c1c2e8",
    },
}


def weights_sha256(path) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a checkpoint's model weights."""
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for name in sorted(k for k in tensors if k.startswith("model.")):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def trained_hashes(recipe: str, tmp_path) -> dict[str, str]:
    cfg = api.config(CONFIGS[recipe])
    if recipe in ("vit", "dit"):
        data = "digits:train"
    else:
        text = tmp_path / "train.txt"
        text.write_text(TEXT)
        data = f"text:{text}"
    store = api.cache(cfg, data, tmp_path / "c.zarr")
    api.train(cfg, store, tmp_path / "blocks")
    api.train(cfg, store, tmp_path / "e2e", e2e=True)
    names = [f"block{b}" for b in range(cfg.model.num_blocks)]
    out = {name: weights_sha256(tmp_path / "blocks" / f"{name}.safetensors") for name in names}
    out["e2e"] = weights_sha256(tmp_path / "e2e" / "e2e.safetensors")
    if recipe == "looped":  # the core and coda trained on a frozen prelude's cached outputs
        frozen = api.config({**CONFIGS[recipe], "model": {**CONFIGS[recipe]["model"],
                                                          "frozen_prelude": str(tmp_path / "e2e")}})
        api.train(frozen, store, tmp_path / "frozen")
        out["frozen_prelude_block0"] = weights_sha256(tmp_path / "frozen" / "block0.safetensors")
    if recipe == "vit":  # the other training paths: chain states, the paper's shared layout
        seq = api.config({**CONFIGS[recipe], "train": {**TRAIN, "mode": "sequential"}})
        api.train(seq, store, tmp_path / "seq")
        out["sequential_block1"] = weights_sha256(tmp_path / "seq" / "block1.safetensors")
        toml = tmp_path / "vit.toml"
        toml.write_text(to_toml(CONFIGS[recipe]))
        r = CliRunner().invoke(main, ["train", str(toml), "--store", str(store), "--out",
                                      str(tmp_path / "shared"), "--paper-shared", "--quiet"])
        assert r.exit_code == 0, r.output
        out["paper_shared"] = weights_sha256(tmp_path / "shared" / "shared.safetensors")
    return out


def to_toml(tables: dict) -> str:
    """A config dict as TOML (flat tables of numbers and strings)."""
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("recipe", sorted(CONFIGS))
def test_a_short_run_trains_the_recorded_weights(recipe, tmp_path):
    assert torch.get_num_threads() == 1
    assert trained_hashes(recipe, tmp_path) == EXPECTED[recipe]
