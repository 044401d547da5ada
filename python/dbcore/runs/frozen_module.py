"""A frozen prelude for the looped LM (`dbcore train ... --freeze-prelude RUN`): its outputs for
every training window are written once into the store, and the core and coda train from them.

The activations live in a sub-store of the training store, `STORE/prelude_<fingerprint[:16]>`: a
complete dbcore store of its own (the tokens, the frozen arrays, the attributes and `prelude_out`
(N, T-1, d) float16) whose `frozen_prelude` attribute names the fingerprint of the prelude weights
that made it (sha256 of the token table and prelude layers of the run's finished checkpoint). It
is written under a temporary name and renamed when complete, so a crash leaves no store that looks
finished; a leftover temporary is removed on the next attempt. A run that trained on one prelude
refuses to resume on another.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch

from dbcore import checkpoint, layout, rundir, store
from dbcore.rundir import RunError
from dbcore.wording import arg

PRELUDE_OUT = "prelude_out"  # (N, T-1, d) float16: the frozen prelude's output of x_0..x_{T-2}
PRELUDE_KEYS = ("embed.", "prelude.")  # the frozen modules' parameter names
ROWS_PER_PASS = 256


def prelude_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The token table and prelude layers of a model's state (names as in the model)."""
    return {k: v for k, v in tensors.items() if k.startswith(PRELUDE_KEYS)}


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_prelude(run: Path) -> dict[str, torch.Tensor]:
    """The prelude of a finished looped run (its block or its baseline checkpoint)."""
    info = rundir.read_run_json(run)
    if info["config"]["model"].get("recipe") != "looped":
        raise RunError(f"--freeze-prelude {run}: not a looped run (recipe "
                       f"{info['config']['model'].get('recipe')!r})")
    name = rundir.E2E if info["kind"] == "e2e" else rundir.block_name(0)
    rundir.done_meta(run, name)
    tensors, _ = checkpoint.load(rundir.checkpoint_base(run, name), prefix="model.")
    return prelude_tensors(tensors)


def check_resumed_run(run: Path, name: str, fp: str) -> None:
    """Refuse to resume checkpoint `name` of `run` if it trained on another prelude."""
    base = rundir.checkpoint_base(run, name)
    if not checkpoint.exists(base):
        return
    tensors, _ = checkpoint.load(base, prefix="model.")
    found = fingerprint(prelude_tensors(tensors))
    if found != fp:
        raise RunError(f"run {run}: {name} was trained on the frozen prelude {found[:16]}, "
                       f"{arg('frozen_prelude')} gives {fp[:16]}; use a new {arg('out')}")


def activation_store(source: Path, model: torch.nn.Module, fp: str, run: Path) -> Path:
    """The sub-store of `source` holding the prelude's outputs under fingerprint `fp` (written if
    missing); `model` is a looped model whose prelude holds the frozen weights."""
    path = Path(source) / f"prelude_{fp[:16]}"
    if path.exists():
        s = store.open(path, require_complete=False)
        made_by = s.attrs.get("frozen_prelude", {}).get("fingerprint")
        if not s.complete or made_by != fp:
            raise RunError(f"{path}: holds activations of prelude {str(made_by)[:16]}, not {fp[:16]} "
                           "(or is incomplete); remove it")
        return path
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():  # what a crash left behind
        shutil.rmtree(tmp)
    src = store.open(source)
    attrs = {**src.attrs, "frozen_prelude": {"fingerprint": fp, "run": str(Path(run).resolve()),
                                             "source": str(Path(source).resolve())}}
    dst = store.create(tmp, attrs)
    for name in (layout.VOCAB, layout.TARGET_EMBEDDING):
        dst.write_array(name, src.read(name))
    n, t = src.info(layout.TOKENS).shape
    d = model.embed.table.embedding_dim
    model.eval()
    with dst.array_writer(layout.TOKENS, (n, t), np.int32) as tokens, \
            dst.array_writer(PRELUDE_OUT, (n, t - 1, d), np.float16) as out, torch.no_grad():
        for start in range(0, n, ROWS_PER_PASS):
            rows = src.read(layout.TOKENS, slice(start, min(n, start + ROWS_PER_PASS)))
            tokens.write(start, rows)
            e, _ = model.context(torch.from_numpy(rows[:, :-1]).long())  # (rows, T-1, d)
            out.write(start, e.to(torch.float16).numpy())
    dst.finalize()
    tmp.rename(path)
    return path
