"""Checkpoints as safetensors + JSON, written atomically and verified on load.

A checkpoint `NAME` is two files: `NAME.safetensors` (tensors) and `NAME.json` (metadata, with the
sha256 of the tensor file). Both are written under temporary names and renamed, tensors first, so
the JSON's presence means the pair is complete; a crash leaves at most `*.tmp` files, which are
ignored and cleaned. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dbcore.errors import CheckpointError
from dbcore.runs import mirror

TENSORS = ".safetensors"  # NAME.safetensors holds a checkpoint's tensors, NAME.json its metadata


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """`model.load_state_dict(tensors)`, or a CheckpointError naming the weights that differ
    (missing, unexpected or of another shape), for a checkpoint written by another model."""
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    resized = [f"{k} {tuple(tensors[k].shape)} vs {tuple(want[k].shape)}"
               for k in sorted(set(want) & set(tensors)) if tensors[k].shape != want[k].shape]
    if missing or unexpected or resized:
        def listed(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        parts = [f"{what} {listed(names)}" for what, names in (
            ("missing", missing), ("unexpected", unexpected), ("found vs expected shape", resized)) if names]
        raise CheckpointError(f"{where}: its weights do not fit this model: {'; '.join(parts)}")
    model.load_state_dict(tensors)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors for safetensors, which refuses names that share memory (tied modules): a
    repeated storage is written as a copy under each of its names."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def save(base: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write `base.safetensors` and `base.json`; returns the tensor file's sha256."""
    base.parent.mkdir(parents=True, exist_ok=True)
    st, js = base.with_suffix(TENSORS), base.with_suffix(".json")
    st_tmp, js_tmp = st.with_name(st.name + ".tmp"), js.with_name(js.name + ".tmp")
    try:
        save_file(_unshared(tensors), str(st_tmp))
        digest = _sha256(st_tmp)
        js_tmp.write_text(json.dumps({**meta, "sha256": digest}, indent=2, sort_keys=True))
        _replace_atomically(st_tmp, st)
    except (OSError, SafetensorError) as exc:  # a full disk, a quota: the last checkpoint stays
        st_tmp.unlink(missing_ok=True)
        js_tmp.unlink(missing_ok=True)
        raise CheckpointError(f"checkpoint {base}: could not be written ({exc}); the previous one is "
                              "kept and training resumes from it once there is space") from None
    _replace_atomically(js_tmp, js)  # the JSON last: a checkpoint exists once it names its tensors
    mirror.published(st, js)  # the same order in a mirrored s3:// run
    return digest


def exists(base: Path) -> bool:
    return base.with_suffix(".json").is_file() and base.with_suffix(TENSORS).is_file()


def load_meta(base: Path) -> dict[str, Any]:
    js = base.with_suffix(".json")
    if not js.is_file():
        raise CheckpointError(f"checkpoint {base}: no {js.name} (missing or interrupted before completion)")
    try:
        return json.loads(js.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {base}: {js.name} is not valid JSON ({exc})") from None


def load(base: Path, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify a checkpoint; keep only tensors whose name starts with `prefix`."""
    meta = load_meta(base)
    st = base.with_suffix(TENSORS)
    if not st.is_file():
        raise CheckpointError(f"checkpoint {base}: {st.name} is missing")
    if _sha256(st) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {base}: {st.name} does not match the sha256 in {base.name}.json")
    try:
        tensors = load_file(str(st))
    except SafetensorError as exc:
        raise CheckpointError(f"checkpoint {base}: unreadable {st.name} ({exc})") from None
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, meta
