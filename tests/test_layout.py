"""The package's layers hold: imports point down (no cycle, imports inside functions included), a
recipe never reaches the store, the run directory or the extension, and `train` opens its store
once, streaming through the same handle."""

import ast
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import dbcore
from dbcore import api
from dbcore.data import store as store_mod
from dbcore.data.stream import BatchStream
from dbcore.method import layout

PACKAGE = Path(dbcore.__file__).parent
# the layers, bottom up (ARCHITECTURE.md): a module imports its own layer and the ones below it;
# the kernels are the method's fused CUDA twins, one layer with it
LAYERS = [{"errors", "wording", "progress"}, {"method", "kernels"}, {"metrics", "models"}, {"recipes"},
          {"config"}, {"data"}, {"runs"}, {"api"}, {"cli", "demo"}]
BELOW_RECIPES = {"errors", "wording", "method", "kernels", "metrics", "models", "recipes"}


def _graph() -> dict[str, set[str]]:
    """Module -> the dbcore modules it imports (at module level or inside a function)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    known = set(modules) | {"dbcore._native"}

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                deps |= {resolve(f"{base}.{a.name}") or resolve(base) for a in node.names}
        graph[name] = {d for d in deps if d and d != name and d.startswith("dbcore")}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_module_imports_itself_through_others():
    graph = _graph()
    cycles = sorted(m for m in graph if m in _reach(graph, m))
    assert cycles == []


def test_a_recipe_reaches_neither_the_store_nor_the_runs_nor_the_extension():
    graph = _graph()
    for name in (m for m in graph if m.startswith("dbcore.recipes")):
        reached = _reach(graph, name)
        assert "dbcore._native" not in reached, name
        layers = {m.split(".")[1] for m in reached}
        assert layers <= BELOW_RECIPES, (name, sorted(layers - BELOW_RECIPES))


def test_imports_point_down_the_layers():
    graph = _graph()
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    for name, deps in graph.items():
        layer = name.split(".")[1] if "." in name else None
        if layer not in rank:
            continue
        for dep in deps:
            below = dep.split(".")[1] if "." in dep else None
            if below in rank:
                assert rank[below] <= rank[layer], f"{name} imports {dep}, a layer above it"


def test_train_opens_its_store_once_and_streams_through_that_handle(tmp_path, monkeypatch):
    cfg = api.config({"model": {"recipe": "vit", "image_size": 8, "channels": 1, "patch_size": 4, "dim": 16,
                                "depth": 2, "heads": 2, "num_blocks": 2},
                      "train": {"steps": 2, "batch_size": 16, "warmup_steps": 1, "device": "cpu"}})
    path = api.cache(cfg, "digits:train", tmp_path / "c.zarr")
    opened, streamed = [], []
    real_open, real_arg = store_mod.open, BatchStream._store_arg
    monkeypatch.setattr(store_mod, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    monkeypatch.setattr(BatchStream, "_store_arg",
                        lambda self: streamed.append(real_arg(self)) or streamed[-1])
    api.train(cfg, path, tmp_path / "run")
    assert len(opened) == 1
    assert len(streamed) == 2 and all(isinstance(s, dbcore._native.NativeStore) for s in streamed)


def test_a_stream_over_an_open_store_reads_no_metadata_again(tmp_path):
    s = store_mod.create(tmp_path / "c.zarr", {"format": layout.FORMAT})
    s.write_array(layout.LABELS, np.arange(40, dtype=np.int64))
    s.finalize()
    s = store_mod.open(tmp_path / "c.zarr")
    for meta in (tmp_path / "c.zarr").rglob("zarr.json"):
        os.remove(meta)
    rows = np.concatenate([b[layout.LABELS] for b in BatchStream(s, [layout.LABELS], 8, shuffle=False)])
    assert np.array_equal(rows, np.arange(40))
    with pytest.raises(store_mod.StoreError):
        BatchStream(tmp_path / "c.zarr", [layout.LABELS], 8)
    shutil.rmtree(tmp_path / "c.zarr")
