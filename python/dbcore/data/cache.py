"""`dbcore cache`: write a source and what its recipe caches for it (`Recipe.cache_arrays`: inputs,
labels, a frozen target embedding...) with provenance to a store. The store records its recipe and
a fingerprint of only the [model] values it depends on (`Config.cache_fields`).

With `noise="cached"` it also writes K noised targets (and their sigmas) per sample per block,
drawn by the counter-based generator keyed by (seed, sample index, block, draw): exactly the values
that `noise="online"` training draws on the fly, so both modes and every backend agree.

Streaming: every array is written in blocks of whole shards (or chunks) of about 32 MiB, taken from
the source (a NumPy memmap works: nothing else is loaded whole); the Rust writer compresses a
block's chunks in parallel while Python computes the next block. Each finished block is recorded
in `STORE/.dbcore-cache-progress`; a run interrupted before `finalize` resumes where it stopped
when started again with the same inputs (finished blocks are not redone). A complete store, or an
interrupted one of other inputs, is refused unless `overwrite`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dbcore.config import Config
from dbcore.data import store
from dbcore.data.location import Location, parse_location
from dbcore.data.sources import Source, source_sha256
from dbcore.method import layout
from dbcore.method.batch import INDEX
from dbcore.method.noise import noised_targets
from dbcore.method.partition import block_range, block_sigma_law, boundaries
from dbcore.progress import bar as progress_bar
from dbcore.recipes import for_config
from dbcore.recipes.base import Recipe
from dbcore.wording import arg

ROWS_PER_WRITE = 4096  # rows per chunk of the noised targets
WRITE_TARGET_BYTES = 32 << 20  # a write covers whole shards or chunks, about this many bytes
LEDGER = ".dbcore-cache-progress"  # in the store: "array start_row" per finished write, for resuming


def schedule_attrs(cfg: Config) -> dict:
    m = cfg.model
    return {
        "num_blocks": m.num_blocks,
        "gamma": m.gamma,
        "sigma_dist": m.sigma_dist,
        "boundaries": boundaries(m.num_blocks),
        "block_ranges": [list(block_range(b, m.num_blocks, m.gamma)) for b in range(m.num_blocks)],
        "block_sigma_laws": [list(block_sigma_law(m.sigma_dist, b, m.num_blocks, m.gamma))
                             for b in range(m.num_blocks)],
    }


def write_cache(
    cfg: Config,
    source: Source,
    out: Location,
    noise: Literal["online", "cached"] = "online",
    draws: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    target_embedding: np.ndarray | None = None,
    break_lock: bool = False,
) -> store.Store:
    """Write the cache store `out`, streaming row blocks (see the module docs for resume).

    `target_embedding`: the frozen rows E (num_classes, dim) to use instead of seeded random
    unit vectors, for recipes with a discrete target (stored as float32 as given: normalise them
    as you mean training to see them).
    """
    plan = plan_cache(cfg, source, noise, draws, seed, target_embedding)
    out = parse_location(out)
    with store.writer_lock(out, break_lock=break_lock):  # a second writer is refused
        s, done = open_for_writing(out, plan.attrs, overwrite)
        units = pending_units(s, plan.jobs, done)
        bar = progress_bar(len(units), "cache", "block", enabled=progress)
        with Ledger(s, done) as ledger:
            write_units(s, plan.jobs, units, on_done=lambda unit: (ledger.record([unit]), bar.update(1)))
        bar.close()
        finish(s)
    return s


@dataclass
class _Job:
    """One array: its layout and the rows [a, b) of its content, computed on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...] | None
    rows: Callable[[int, int], np.ndarray]


@dataclass
class CachePlan:
    """What a cache of these inputs holds: the store's attributes and its arrays' contents."""

    attrs: dict
    jobs: list[_Job]


Unit = tuple[str, int, int]  # (array, first row, end row): one write of whole shards or chunks


def plan_cache(
    cfg: Config,
    source: Source,
    noise: Literal["online", "cached"] = "online",
    draws: int = 1,
    seed: int = 0,
    target_embedding: np.ndarray | None = None,
) -> CachePlan:
    """Check the cache options and lay out the store: attributes (with provenance) and arrays."""
    if noise not in ("online", "cached"):
        raise ValueError(f"noise must be 'online' or 'cached', found {noise!r}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, found {draws}")
    recipe = for_config(cfg)
    if noise == "cached" and not recipe.cached_noise:
        raise ValueError(f"recipe {cfg.recipe!r} draws its noise online only; drop {arg('noise', 'cached')}")
    if target_embedding is not None and layout.TARGET_EMBEDDING not in recipe.frozen_arrays:
        raise ValueError(f"recipe {cfg.recipe!r} has no target embedding; drop {arg('target_embedding')}")
    arrays, recipe_attrs = recipe.cache_arrays(source, seed, target_embedding)
    n = len(arrays[recipe.stream_arrays[0]])
    cached = noise == "cached"
    attrs = {
        "format": layout.FORMAT,
        "format_version": layout.FORMAT_VERSION,
        "recipe": cfg.recipe,
        "source": {"spec": source.spec, "sha256": source_sha256(source), "num_samples": n,
                   **({"classes": list(source.classes)} if getattr(source, "classes", None) else {})},
        "cache_fields": cfg.cache_fields(cached),
        "cache_fingerprint": cfg.cache_fingerprint(cached),
        "noise": {"mode": noise, "draws": draws if cached else 0, "seed": seed},
        **recipe_attrs,
    }
    if cached:
        attrs["schedule"] = schedule_attrs(cfg)
    jobs = [_Job(name, tuple(rows.shape), str(np.dtype(rows.dtype)), None, _slicer(rows))
            for name, rows in arrays.items()]
    if cached:
        jobs += _noise_jobs(recipe, arrays, draws, seed)
    return CachePlan(json.loads(json.dumps(attrs)), jobs)  # attrs as the store returns them


def _slicer(rows: np.ndarray) -> Callable[[int, int], np.ndarray]:
    return lambda a, b: np.asarray(rows[a:b])


Done = set[tuple[str, int]]  # (array, first row) of the finished write units


def open_for_writing(out: Location, attrs: dict, overwrite: bool) -> tuple[store.Store, Done]:
    """A fresh store, or the interrupted one at `out` (same inputs) and its finished write units."""
    if overwrite or not store.exists(out):
        return store.create(out, attrs=attrs, overwrite=overwrite), set()
    s = store.open(out, require_complete=False)
    if s.complete:
        raise store.StoreExistsError(
            f"{out}: already exists and holds a complete cache; "
            f"pass {arg('overwrite', True)} to rewrite it"
        )
    if s.attrs != attrs:
        raise store.StoreExistsError(
            f"{out}: exists and holds an interrupted cache of other inputs (source, config, noise "
            f"or seed) or of another tool; pass {arg('overwrite', True)} to replace it"
        )
    # Same inputs; no ledger yet: killed before its first unit was recorded, so none is done.
    ledger = s.read_extra(LEDGER) or b""
    done = set()
    for line in ledger.decode(errors="replace").splitlines():
        name, _, start = line.rpartition(" ")
        if name and start.isdigit():
            done.add((name, int(start)))
    return s, done


class Ledger:
    """`STORE/.dbcore-cache-progress`, one line per finished write unit: appended to in a local
    store, rewritten whole in an s3:// one (objects do not append)."""

    def __init__(self, s: store.Store, done: Done) -> None:
        self._store = s
        self._file = open(s.path / LEDGER, "a") if s.is_local else None
        self._text = "" if s.is_local else _ledger_lines(sorted(done))
        if not s.is_local:  # the object exists from the start: the store is resumable
            s.write_extra(LEDGER, self._text.encode())

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def record(self, units: list[Unit]) -> None:
        lines = _ledger_lines((name, a) for name, a, _ in units)
        if self._file is not None:
            self._file.write(lines)
            self._file.flush()
        else:
            self._text += lines
            self._store.write_extra(LEDGER, self._text.encode())


def _ledger_lines(done: Iterable[tuple[str, int]]) -> str:
    """The ledger's lines, "array start_row" each (read back by `open_for_writing`)."""
    return "".join(f"{name} {a}\n" for name, a in done)


def finish(s: store.Store) -> None:
    """Mark the store complete, then drop its ledger."""
    s.finalize()
    s.erase_extra(LEDGER)


def _unit_rows(info: store.ArrayInfo) -> int:
    """Rows per write: whole shards (or whole chunks), about WRITE_TARGET_BYTES at least."""
    row_bytes = max(1, info.nbytes // max(1, info.shape[0]))
    unit = info.shards[0] if info.shards else info.chunks[0]
    return max(1, unit) * max(1, WRITE_TARGET_BYTES // (max(1, unit) * row_bytes))


def pending_units(s: store.Store, jobs: list[_Job], done: Done) -> list[Unit]:
    """Create the arrays a fresh store lacks (checking those it has) and list the write units
    still to do, in job order. Units never share a shard or chunk, so any split of them can be
    written by separate processes."""
    units = []
    for job in jobs:
        if job.name in s.arrays():
            info = s.info(job.name)
            if info.shape != tuple(job.shape) or info.dtype != job.dtype:
                raise store.CorruptStoreError(f"{s.path}: array {job.name!r} is {info.shape} {info.dtype}, "
                                              f"expected {tuple(job.shape)} {job.dtype}; "
                                              f"pass {arg('overwrite', True)}")
        else:
            s.create_array(job.name, job.shape, job.dtype, chunks=job.chunks)
            info = s.info(job.name)
        unit = _unit_rows(info)
        units += [(job.name, a, min(job.shape[0], a + unit))
                  for a in range(0, job.shape[0], unit) if (job.name, a) not in done]
    return units


def write_units(s: store.Store, jobs: list[_Job], units: list[Unit],
                on_done: Callable[[Unit], object] = lambda unit: None) -> None:
    """Write `units` of the store's (existing) arrays; `on_done(unit)` once each is on disk.

    The next block is computed while the previous one is compressed (in parallel, in Rust, GIL
    released) and written."""
    by_name = {job.name: job for job in jobs}
    writers = {name: store.ArrayWriter(s, name, by_name[name].shape, np.dtype(by_name[name].dtype))
               for name in dict.fromkeys(name for name, _, _ in units)}
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: list[tuple[Future, Unit]] = []

        def complete(f: Future, unit: Unit) -> None:
            f.result()
            on_done(unit)

        for unit in units:
            name, a, b = unit
            block = np.ascontiguousarray(by_name[name].rows(a, b))
            while len(pending) >= 2:
                complete(*pending.pop(0))
            pending.append((pool.submit(writers[name].write, a, block), unit))
        for p in pending:
            complete(*p)
    for w in writers.values():
        w.close()


def _noise_jobs(recipe: Recipe, arrays: dict[str, np.ndarray], draws: int, seed: int) -> list[_Job]:
    m = recipe.model_cfg
    frozen = {name: torch.from_numpy(np.asarray(arrays[name])) for name in recipe.frozen_arrays}
    shape = recipe.target_shape(frozen)
    n = len(arrays[recipe.stream_arrays[0]])
    chunk = max(1, min(ROWS_PER_WRITE, n))
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def noised(b: int, a: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if (b, a) not in cache:  # z and sigma of the same rows: computed once, used twice
            cache.clear()
            idx = torch.arange(a, stop)
            rows = {k: torch.from_numpy(np.ascontiguousarray(arrays[k][a:stop]))
                    for k in recipe.stream_arrays}
            y = recipe.targets({**rows, INDEX: idx}, frozen)  # (n, ...)
            zs, sigmas = [], []
            for k in range(draws):
                z, sigma = noised_targets(y, idx, seed, b, k, recipe.sigma_law(b))
                zs.append(z)
                sigmas.append(sigma)
            z_all = torch.stack(zs, dim=1).float().numpy()  # (n, K, ...)
            cache[(b, a)] = (z_all, torch.stack(sigmas, dim=1).float().numpy())  # (n, K)
        return cache[(b, a)]

    jobs = []
    for b in range(m.num_blocks):
        jobs.append(_Job(layout.noised_z(b), (n, draws, *shape), "float32", (chunk, draws, *shape),
                         lambda a, stop, b=b: noised(b, a, stop)[0]))
        jobs.append(_Job(layout.noised_sigma(b), (n, draws), "float32", (chunk, draws),
                         lambda a, stop, b=b: noised(b, a, stop)[1]))
    return jobs
