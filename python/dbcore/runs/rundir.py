"""The run directory: the one module that knows its files and their errors.

    RUN/run.json                  kind ("blocks" | "e2e" | "paper-shared"), store, config
    RUN/block{b}.safetensors/.json a block's checkpoint (weights, optimizer, stream position)
    RUN/e2e.*, RUN/shared.*        the baseline's / the paper-shared layout's checkpoint
    RUN/chain/block{b}.zarr        states that trained blocks < b hand to block b (sequential mode)
    RUN/metrics.jsonl              one JSON line per logged step
    RUN/.block{b}.lock, .e2e.lock  held by the process training that checkpoint (`writing`)

A run at `s3://bucket/prefix` is worked on in a local mirror (`dbcore.runs.mirror`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dbcore.data import store
from dbcore.data.location import is_url
from dbcore.errors import RunError
from dbcore.method import layout
from dbcore.runs import checkpoint, mirror
from dbcore.runs.mirror import METRICS
from dbcore.wording import arg

KINDS = ("blocks", "e2e", "paper-shared")
E2E = "e2e"
SHARED = "shared"


def block_name(block: int) -> str:
    return f"block{block}"


def checkpoint_base(run: Path, name: str) -> Path:
    return Path(run) / name


def chain_path(run: Path, block: int) -> Path:
    return Path(run) / "chain" / f"block{block}.zarr"


def log_metrics(run: Path, record: dict) -> None:
    path = Path(run) / METRICS
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:  # a full disk: say so in one line; the checkpoints are untouched
        raise RunError(f"run {run}: could not append to {path.name} ({exc})") from None
    if "name" in record:
        mirror.metrics_logged(run, record["name"])


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS
    if not path.is_file():
        raise RunError(f"run {run}: no {METRICS} (was it trained?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def writing(run: Path, name: str, writer: bool = True) -> Iterator[None]:
    """Hold the right to train checkpoint `name` of `run` while the block runs: a second job
    training it (another `train`, a Ray task, a second torchrun) is refused with one line. Only
    the writer (rank 0) holds it: a local lock, as the store's, and for the mirror of an `s3://`
    run the lock object beside the checkpoint in the bucket too (jobs on other machines)."""
    if not writer:
        yield
        return
    locks: list[tuple[str | Path, str]] = [(Path(run) / name, f"checkpoint of run {run}")]
    remote = mirror.url_of(Path(run) / name)
    if remote:
        locks.append((remote, f"checkpoint of run {mirror.url_of(Path(run))}"))
    with contextlib.ExitStack() as held:
        for where, what in locks:
            try:
                held.enter_context(store.writer_lock(where, what=what, breakable=False))
            except store.StoreLockedError as exc:
                raise RunError(str(exc)) from None
        yield


def write_run_json(run: Path, config_dict: dict, store_path: Path, kind: str) -> None:
    """Create RUN/run.json, or check that an existing one holds the same kind and config."""
    if kind not in KINDS:
        raise ValueError(f"run kind must be one of {KINDS}, got {kind!r}")
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    store = store_path if is_url(store_path) else str(Path(store_path).resolve())
    info = {"kind": kind, "store": store, "config": config_dict}
    path = run / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("kind") != kind:
            raise RunError(f"run {run}: holds a {old.get('kind')} run, not a {kind} run (each kind, "
                           f"blocks or {arg('e2e')}, needs its own run directory); use a new {arg('out')}")
        if not _same_config(old.get("config"), info["config"]):
            raise RunError(f"run {run}: holds a {kind} run of another config; use a new {arg('out')}")
        return
    tmp = path.with_name("run.json.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(path)
    mirror.published(path)


def _same_config(old: Any, new: dict) -> bool:
    """Whether a run's recorded config is `new`, keys that a later version added (at their
    defaults) aside: a run trained before an upgrade still resumes."""
    from dbcore.config import from_dict
    from dbcore.errors import ConfigError

    if old == new:
        return True
    try:
        return from_dict(old, "run.json").to_dict() == from_dict(new, "run.json").to_dict()
    except (ConfigError, ValueError, TypeError, KeyError):
        return False


def read_run_json(run: Path) -> dict[str, Any]:
    path = Path(run) / "run.json"
    if not path.is_file():
        raise RunError(f"{run}: no run.json; is this a directory written by `dbcore train`?")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from None
    if info.get("kind") not in KINDS or "config" not in info:
        raise RunError(f"{path}: expected fields 'kind' (one of {KINDS}) and 'config'")
    return info


def _check_recipe(run: Path, name: str, meta: dict, recipe: str | None) -> None:
    found = meta.get("recipe")
    if recipe is not None and found is not None and found != recipe:
        raise RunError(f"run {run}: checkpoint {name} was trained by recipe {found!r}, the run's config "
                       f"is recipe {recipe!r}")


def load_model(run: Path, name: str, model: nn.Module, require_done: bool = True,
               recipe: str | None = None) -> nn.Module:
    """Load checkpoint `name` of the run into `model` (built by `recipe`); eval mode."""
    base = checkpoint_base(run, name)
    tensors, meta = checkpoint.load(base, prefix="model.")
    _check_recipe(run, name, meta, recipe)
    if require_done and not meta.get("done"):
        raise RunError(f"run {run}: {name} has not finished training (step {meta.get('step')})")
    checkpoint.load_into(model, tensors, f"run {run}: checkpoint {name}")
    return model.eval()


def frozen_from_checkpoint(run: Path, name: str, keys: tuple[str, ...], required: bool = True,
                           recipe: str | None = None) -> dict[str, torch.Tensor]:
    """The frozen buffers (e.g. the target embedding) saved in checkpoint `name`."""
    _check_recipe(run, name, checkpoint.load_meta(checkpoint_base(run, name)), recipe)
    if not keys:
        return {}
    tensors, _ = checkpoint.load(checkpoint_base(run, name), prefix="model.")
    out = {}
    for k in keys:
        hits = [v for n, v in tensors.items() if n == k or n.endswith("." + k)]
        if hits:
            out[k] = hits[0]
        elif required:
            old = k == layout.TOKENIZER and any(n.endswith(layout.OLD_VOCAB) for n in tensors)
            why = "; it was trained on a text store of an older layout: train it again" if old else ""
            raise RunError(f"run {run}: checkpoint {name} lacks the frozen array {k!r}{why}")
    return out


def done_meta(run: Path, name: str) -> dict[str, Any]:
    meta = checkpoint.load_meta(checkpoint_base(run, name))
    if not meta.get("done"):
        raise RunError(f"run {run}: {name} has not finished training (step {meta.get('step')})")
    return meta


def load_trained_block(run: Path, recipe: Any, block: int, frozen: dict[str, torch.Tensor]) -> nn.Module:
    """Block `block` built alone by the recipe, with its finished checkpoint loaded."""
    return load_model(run, block_name(block), recipe.build_block(block, frozen), recipe=recipe.name)
