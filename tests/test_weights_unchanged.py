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

# recipe -> {checkpoint: sha256 of its model weights}, recorded before the restructure; the language
# models' recorded again when text became one token stream cut into jittered windows at read time
EXPECTED: dict[str, dict[str, str]] = {
    "arlm": {
        "block0": "1a5fb38b3b3a2d6f4ad68d56c270d2a8363ade0066beb0fe606cd98bae55b94e",
        "block1": "f78b3a9cc33f3d4e9dfa72ccecf044c6618408b12f14fa99f0e52a75c3c96d19",
        "e2e": "1897696a8ae4e2c0e2947da36747b5d86e8e83fe85fc932c1b7862284760b12d",
    },
    "dit": {
        "block0": "88168fd071ccec59744107e692e6e29c251fdaaddd8a7fe94f10c6712629559b",
        "block1": "5a50748c3fdb2256c6c2f55d6abe30784382381476c0fc02d9e280008cd1effe",
        "e2e": "188a94c8c1e006e5ce0b370d3cf23d340ecedb2c6555dbfdf6e8960af4482f7e",
    },
    "looped": {
        "block0": "9019bbd304eb1fda600508ff2ed697d12f3e5c3ce5010f2a9aa2a8b803da6447",
        "e2e": "772a738954a6282338035674b8e28c107f93655fa43bc0f35cd8d9f365833553",
        "frozen_prelude_block0": "49b9dca6e8f653893c72881f08b4e23d9f3f8fe941ac8db60a4d68f15ebf406b",
    },
    "mdlm": {
        "block0": "46916494ab36b3c68c3b8244c193fb6379fd17e7fcf8e31efc7bc1716dfd8d8b",
        "block1": "af2e31024dd82e343b4da8cb2a054afbd60761bc8c599b0c0afe67d8a91ca675",
        "e2e": "98350a5e9fd375f59c30173b5484c52eac8bfb42464ac1c684821149acc37d6a",
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
