"""Training beside a frozen module (`Recipe.frozen_module`, e.g. the looped LM's prelude with
`dbcore train ... --freeze-prelude RUN`): the module's outputs for every training row are written
once into the store, and training streams them instead of running the module.

The outputs live in a sub-store of the training store, `STORE/prelude_<fingerprint[:16]>`: a
complete dbcore store of its own (the streamed input arrays, the recipe's frozen arrays, the
attributes, and the outputs) whose `frozen_prelude` attribute names the fingerprint of the frozen
weights that made it (sha256 of the frozen modules' tensors in the run's finished checkpoint). It
is written under a temporary name and renamed when complete, so a crash leaves no store that looks
finished; a leftover temporary is removed on the next attempt. A run that trained on one frozen
module refuses to resume on another.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dbcore.data import store
from dbcore.data.frozen import read_frozen
from dbcore.data.location import is_url
from dbcore.errors import RunError
from dbcore.recipes.base import FrozenModule, Recipe
from dbcore.runs import checkpoint, rundir
from dbcore.wording import arg

ROWS_PER_PASS = 256
STORE_ATTR = "frozen_prelude"  # the sub-store's attribute naming the weights that made it


def module_tensors(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The frozen modules' tensors of a model's state (names as in the model)."""
    return {k: v for k, v in tensors.items() if k.startswith(prefixes)}


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_module(spec: FrozenModule, recipe: str) -> dict[str, torch.Tensor]:
    """The frozen modules of a finished run of `recipe` (its baseline's checkpoint or block 0's)."""
    run = Path(spec.run)
    info = rundir.read_run_json(run)
    found = info["config"]["model"].get("recipe")
    if found != recipe:
        raise RunError(f"{arg(spec.option)} {run}: not a {recipe} run (recipe {found!r})")
    name = rundir.E2E if info["kind"] == "e2e" else rundir.block_name(0)
    rundir.done_meta(run, name)
    tensors, _ = checkpoint.load(rundir.checkpoint_base(run, name), prefix="model.")
    return module_tensors(tensors, spec.prefixes)


def check_resumed_run(run: Path, name: str, fp: str, spec: FrozenModule) -> None:
    """Refuse to resume checkpoint `name` of `run` if it trained beside other frozen weights."""
    base = rundir.checkpoint_base(run, name)
    if not checkpoint.exists(base):
        return
    tensors, _ = checkpoint.load(base, prefix="model.")
    found = fingerprint(module_tensors(tensors, spec.prefixes))
    if found != fp:
        raise RunError(f"run {run}: {name} was trained on the frozen prelude {found[:16]}, "
                       f"{arg(spec.option)} gives {fp[:16]}; use a new {arg('out')}")


def stream_windows(recipe: Recipe, s: store.Store) -> tuple[int, int] | None:
    """The recipe's windows (`Recipe.stream_windows`) when store `s` keeps a flat stream; None for
    a sub-store of a frozen module's outputs, which keeps the windows it computed them on as rows."""
    windows = recipe.stream_windows()
    return windows if windows is not None and len(s.info(recipe.stream_arrays[0]).shape) == 1 else None


def training_store(recipe: Recipe, s: store.Store, run: Path, name: str) -> store.Store:
    """The store that checkpoint `name` of `run` trains from: `s`, or with a frozen module the
    sub-store of its outputs (written once). The recipe is given the frozen weights."""
    spec = recipe.frozen_module()
    if spec is None:
        return s
    if is_url(s.path):  # the sub-store is renamed into place: a local folder
        raise RunError(f"{s.path}: {arg(spec.option)} caches the prelude's outputs in a "
                       "local store; copy the store to local disk first")
    tensors = load_module(spec, recipe.name)
    fp = fingerprint(tensors)
    check_resumed_run(Path(run), name, fp, spec)
    recipe.freeze(tensors)
    return _output_store(recipe, s, fp, spec)


def _row_reader(src: store.Store, windows: tuple[int, int] | None) -> Callable[[str, slice], np.ndarray]:
    """Rows of an input array: as stored, or the windows of a flat stream at offsets i * stride
    (without the training stream's jitter: outputs are computed once, on fixed windows), int32."""
    if windows is None:
        return lambda name, rows: src.read(name, rows)
    seq_len, stride = windows
    views: dict[str, np.ndarray] = {}  # a text stream, read once: small beside the outputs (n, T, d)

    def read(name: str, rows: slice) -> np.ndarray:
        if name not in views:
            views[name] = np.lib.stride_tricks.sliding_window_view(src.read(name), seq_len)[::stride]
        return np.asarray(views[name][rows], dtype=np.int32)

    return read


def _output_store(recipe: Recipe, src: store.Store, fp: str, spec: FrozenModule) -> store.Store:
    """The sub-store of `src` holding the frozen modules' outputs under fingerprint `fp`."""
    path = Path(src.path) / f"prelude_{fp[:16]}"
    if path.exists():
        s = store.open(path, require_complete=False)
        made_by = s.attrs.get(STORE_ATTR, {}).get("fingerprint")
        if not s.complete or made_by != fp:
            raise RunError(f"{path}: holds activations of prelude {str(made_by)[:16]}, not {fp[:16]} "
                           "(or is incomplete); remove it")
        return s
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():  # what a crash left behind
        shutil.rmtree(tmp)
    attrs = {**src.attrs, STORE_ATTR: {"fingerprint": fp, "run": str(Path(spec.run).resolve()),
                                       "source": str(Path(src.path).resolve())}}
    dst = store.create(tmp, attrs)
    for name in recipe.frozen_arrays:
        dst.write_array(name, src.read(name))
    model = recipe.build_e2e(read_frozen(src, recipe.frozen_arrays)).eval()
    inputs = [a for a in recipe.stream_arrays if a != spec.output]
    read = _row_reader(src, stream_windows(recipe, src))
    n = len(read(inputs[0], slice(0, None)))
    writers: dict[str, store.ArrayWriter] = {}
    try:
        with torch.no_grad():
            for start in range(0, n, ROWS_PER_PASS):
                rows = {a: read(a, slice(start, min(n, start + ROWS_PER_PASS))) for a in inputs}
                out = recipe.frozen_outputs(model, {a: torch.from_numpy(r) for a, r in rows.items()}).numpy()
                if not writers:
                    for a in inputs:
                        writers[a] = dst.array_writer(a, (n, *rows[a].shape[1:]), rows[a].dtype)
                    writers[spec.output] = dst.array_writer(spec.output, (n, *out.shape[1:]), out.dtype)
                for a in inputs:
                    writers[a].write(start, rows[a])
                writers[spec.output].write(start, out)
    finally:
        for w in writers.values():
            w.close()
    dst.finalize()
    tmp.rename(path)
    return store.open(path)
