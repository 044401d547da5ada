"""Streaming mini-batches out of a store, the work done in Rust (`rust/src/stream/`).

    s = BatchStream("cache.zarr", ["images", "labels"], batch_size=128, seed=0)
    for batch in s:             # one epoch per iteration; dicts of numpy arrays + "index"
        ...
    s.state_dict()              # {"epoch": e, "position": batches already yielded, ...}

Order: a pure function of (seed, epoch) and the store's chunking, the same for any number of
ranks or workers. `shuffle=True` ("chunks") shuffles the chunks, cuts them into windows of
`window_chunks` chunks and shuffles the samples of each window: by default a window holds at
least 4 chunks and 4096 rows, at most 128 MiB of decoded rows of the streamed arrays (never less
than one chunk), a function of the store and the arrays only; see `window_chunks` / `chunk_rows`
(the chunk is the read unit of the streamed array with the largest rows). `window_bytes` sizes the
window in bytes of decoded rows instead (whole chunks; refused below one chunk or one global batch,
or above the memory available); `plan` reports the window in use. `shuffle="exact"` is one
uniform permutation of all samples (each batch then decodes from everywhere: slower on big
stores); `shuffle=False` reads in order.

Remote stores (`s3://`) are read through the local disk cache (`store.configure_cache`): each
object downloaded whole, once, the objects of the next window prefetched while this one is read.
When the cache cannot hold the streamed arrays, the default order becomes shard-aware: the chunk
is the object (a shard) of the largest array and a window holds at most a third of the cache's
limit (and 128 MiB of rows), so each object is downloaded once an epoch; still a permutation of
the samples each epoch, a pure function of (seed, epoch). `shuffle="exact"` stays available (with
a cache that is too small it downloads objects again and again).

Sharding: global batches of `batch_size * world_size`, rank r takes slice r of each; the final
partial global batch is dropped (`drop_last`) or split into near-equal parts, so ranks never
repeat or miss a sample (use `drop_last=True` under DDP, so every rank has as many batches).

Threads: each iterating process runs two Rust threads (decode-ahead, assemble) and a decode pool
of `threads` (default min(4, cores), at most `STREAM_MAX_THREADS` = 16); the GIL is released while
waiting and decoding. Threads start lazily in the process that iterates: a stream created before a
`fork` (DataLoader workers) starts afresh in the child (the parent's threads are left alone), and
the pool is private, so it nests safely inside other thread pools.

As a `torch.utils.data.IterableDataset`: `DataLoader(stream, batch_size=None, num_workers=W)`;
worker w yields the batches position+w, position+w+W, ..., which the DataLoader interleaves back
into the same order. Under a DataLoader the workers hold copies: call `set_epoch(e)` before each
epoch and count the batches you consumed to resume (`load_state_dict({"epoch": e, "position": p})`).

Windows: `windows=(seq_len, stride)` streams samples cut at read time from flat 1-D arrays (a
text store's `tokens`): sample i of an epoch is `tokens[o : o + seq_len]` with o from
`window_offsets` (start i * stride, moved by a counter-based draw within the stride), given as
int64; an epoch has (num_tokens - seq_len) // stride + 1 samples, and order, sharding, resume and
noise work on these sample indices as on rows.

Online noise: `noise=(seed, block, gaussians, uniforms)` adds, per sample and with draw = epoch,
`gaussians` standard normals (`"eps"`, (B, gaussians) float64, when gaussians > 0) and `uniforms`
uniforms in (0, 1) (`"uniforms"`, (B, uniforms) float64, when uniforms > 0) from the Rust Philox,
equal to `dbcore.method.rng.gaussian` / `dbcore.method.rng.uniforms_of` of the batch's indices (the counter
layout is `dbcore.method.rng`'s contract). Column 0 of `"uniforms"` is the uniform that picks sigma;
columns 4..6 are target mixing's uniforms. Either count may be 0 (e.g. a trainer that draws the
Gaussians on the GPU asks only for uniforms). They are drawn when the batch is taken, for it alone,
into buffers reused once it is dropped: noise memory does not grow with the window or the width.

Noised targets of block b (`for_block`): with a cached store the epoch's draw `epoch % K` of
`noised_z_b{b}` / `noised_sigma_b{b}`; with an online store the Gaussians and uniforms of draw =
epoch, which `noised_targets` maps to (z, sigma) like `dbcore.method.noise.noised_targets`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from dbcore import _native
from dbcore.data import store as store_mod
from dbcore.data.location import parse_location
from dbcore.data.store import _native_errors
from dbcore.method import layout, rng
from dbcore.method.batch import EPS, INDEX, UNIFORMS
from dbcore.wording import arg

STREAM_MAX_THREADS: int = _native.STREAM_MAX_THREADS


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable; all of it where unknown)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_window_bytes(window_bytes: int) -> None:
    """Refuse a shuffle window that is not positive or larger than the memory available (one line;
    one below a chunk or a batch is refused when the stream opens, knowing the rows' size)."""
    free = available_memory()
    if not 0 < window_bytes <= free:
        raise ValueError(f"{arg('shuffle_window_mb', round(window_bytes / 2**20, 3))}: the shuffle window "
                         f"must be more than 0 and at most the memory available ({free / 2**20:.0f} MiB)")


def _shuffle_name(shuffle: bool | str) -> str:
    if shuffle is True:
        return "chunks"
    if shuffle is False:
        return "sequential"
    if shuffle in ("chunks", "exact", "sequential"):
        return shuffle
    raise ValueError(f"shuffle must be True, False, 'chunks', 'exact' or 'sequential', got {shuffle!r}")


class BatchStream(IterableDataset):
    """Mini-batches of `arrays` (dicts of numpy arrays plus `"index"`), see the module docs.

    `draw`: arrays of shape (N, K, ...) of which each epoch takes draw `epoch % K` (giving
    (B, ...)). `noise`: (seed, block, gaussians, uniforms) to add `"eps"` (B, gaussians) (when
    gaussians > 0) and `"uniforms"` (B, uniforms) (when uniforms > 0) from the counter-based
    generator, draw = epoch (see the module docs).
    """

    def __init__(
        self,
        store: store_mod.Store | str | os.PathLike[str],
        arrays: Sequence[str],
        batch_size: int,
        shuffle: bool | str = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        *,
        draw: Sequence[str] = (),
        noise: tuple[int, int, int, int] | None = None,
        window_chunks: int | None = None,
        window_bytes: int | None = None,
        chunk_rows: int | None = None,
        threads: int | None = None,
        prefetch: int = 4,
        epoch: int = 0,
        windows: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(store, store_mod.Store):  # streamed through the open handle in this process
            self.store_path, self._store, self._store_pid = store.path, store, os.getpid()
        else:
            self.store_path, self._store, self._store_pid = parse_location(store), None, 0
        self.arrays = list(arrays)
        unknown = set(draw) - set(self.arrays)
        if unknown:
            raise ValueError(f"draw names arrays not streamed: {sorted(unknown)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if threads is not None and not 1 <= threads <= STREAM_MAX_THREADS:
            raise ValueError(f"threads must be in 1..{STREAM_MAX_THREADS}, got {threads}")
        if noise is not None:
            if len(noise) != 4:
                raise ValueError(f"noise must be (seed, block, gaussians, uniforms), got {noise!r}")
            noise = tuple(int(v) for v in noise)
            rng.check_request(noise[2], noise[3])
        self.draw = [a in set(draw) for a in self.arrays]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle = _shuffle_name(shuffle)
        self.drop_last, self.noise = drop_last, noise
        if window_bytes is not None:
            check_window_bytes(window_bytes)
        self.window_chunks, self.window_bytes, self.chunk_rows, self.threads, self.prefetch = (
            window_chunks, window_bytes, chunk_rows, threads, prefetch)
        self.windows = None if windows is None else (int(windows[0]), int(windows[1]))
        self.epoch, self.position = int(epoch), 0
        self._native: _native.NativeStream | None = None
        self._key: tuple[int, int, int] | None = None  # (pid, worker, num_workers) of _native
        self._open(0, 1)  # validates now; opened again lazily in another process or worker

    # ------------------------------------------------------------------ native handle, per process

    def _open(self, worker: int, num_workers: int) -> _native.NativeStream:
        key = (os.getpid(), worker, num_workers)
        if self._native is not None and self._key == key:
            return self._native
        with _native_errors():
            native = _native.NativeStream(
                self._store_arg(), self.arrays, self.draw, self.batch_size, self.shuffle,
                self.seed, self.rank, self.world_size, self.drop_last, self.chunk_rows,
                self.window_chunks, self.window_bytes, self.threads, self.prefetch, worker, num_workers,
                self.noise, None if self.windows is None else (*self.windows, True),
            )
        if self._native is not None and self._key is not None and self._key[0] == key[0]:
            self._native.stop()
        self._native, self._key = native, key
        self._outputs = [(name, tuple(shape), np.dtype(dt)) for name, shape, dt in native.outputs()]
        return native

    def _store_arg(self) -> _native.NativeStore | str:
        """The open store's native handle in the process that opened it; elsewhere (a forked or
        spawned worker) the store's location, opened afresh there."""
        if self._store is not None and self._store_pid == os.getpid():
            return self._store.native
        return os.fspath(self.store_path)

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_native"], d["_key"], d["_store"] = None, None, None
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)

    # ------------------------------------------------------------------ sizes

    def __len__(self) -> int:
        """Batches of this rank per epoch."""
        return self._handle().num_batches

    def _handle(self) -> _native.NativeStream:
        if self._native is None:
            return self._open(0, 1)
        return self._native

    @property
    def num_samples(self) -> int:
        """Samples of this rank per epoch."""
        return self._handle().num_rank_samples

    @property
    def remaining(self) -> int:
        """Batches left in the current epoch (for a progress bar)."""
        return len(self) - self.position

    @property
    def plan(self) -> dict[str, int]:
        """The shuffle unit (`chunk_rows`), window (`window_chunks`, and its decoded `window_bytes`)
        and decode `threads` in use."""
        h = self._handle()
        row_bytes = sum(int(np.prod(shape)) * dt.itemsize for _, shape, dt in self._outputs)
        return {"chunk_rows": h.chunk_rows, "window_chunks": h.window_chunks,
                "window_bytes": h.window_chunks * h.chunk_rows * row_bytes, "threads": h.threads}

    def order(self, epoch: int) -> np.ndarray:
        """The global sample order of `epoch` (before sharding)."""
        return self._handle().order(epoch)[0]

    # ------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` stood. A position counts global batches (every rank is at the same
        one), so a state saved by another number of ranks loads if the global batch is the same."""
        for k in ("seed", "shuffle"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"state has {k}={state[k]!r}, this stream {getattr(self, k)!r}")
        if "batch_size" in state:
            saved = state["batch_size"] * state.get("world_size", 1)
            if saved != self.batch_size * self.world_size:
                here = self.batch_size * self.world_size
                raise ValueError(f"state has a global batch of {saved} ({state['batch_size']} x "
                                 f"{state.get('world_size', 1)} ranks), this stream {here} "
                                 f"({self.batch_size} x {self.world_size})")
        self.epoch, self.position = int(state["epoch"]), int(state.get("position", 0))

    # ------------------------------------------------------------------ iteration

    def _to_dict(self, item) -> dict[str, np.ndarray]:
        _, _, idx, bufs, eps, uni = item
        m = len(idx)
        out = {name: buf.view(dt).reshape(m, *shape)
               for (name, shape, dt), buf in zip(self._outputs, bufs, strict=True)}
        if self.windows is not None:  # token ids: uint16/uint32 as stored, int64 for torch
            out = {name: a.astype(np.int64) for name, a in out.items()}
        out[INDEX] = idx.astype(np.int64)
        if eps is not None:
            out[EPS] = eps.view(np.float64).reshape(m, self.noise[2])
        if uni is not None:
            out[UNIFORMS] = uni.reshape(m, self.noise[3])
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """The rest of the current epoch; then the epoch advances."""
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        native = self._open(worker, num_workers)
        if self.position >= native.num_batches > 0:  # the last epoch was consumed but not closed
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        native.start(epoch, self.position)
        try:
            while True:
                with _native_errors():
                    item = native.next()
                if item is None:
                    break
                self.position = item[1] + 1
                yield self._to_dict(item)
            if self.epoch == epoch:
                self.epoch, self.position = epoch + 1, 0
        finally:
            native.stop()

    def close(self) -> None:
        """Stop the background threads now (they also stop when the stream is collected)."""
        if self._native is not None and self._key is not None and self._key[0] == os.getpid():
            self._native.stop()

    # ------------------------------------------------------------------ a block's noised targets

    # ------------------------------------------------------------------ a window's offset

    @staticmethod
    def window_offsets(indices: np.ndarray, epoch: int, seed: int, num_tokens: int,
                       windows: tuple[int, int]) -> np.ndarray:
        """The first token of each sample's window (the Rust stream's rule, `rust/src/stream/
        windows.rs`): min(i * stride + floor(u * stride), num_tokens - seq_len), u the sample's
        uniform 0 keyed by (seed, i, `rng.DATA_BLOCK`, draw = epoch)."""
        seq_len, stride = windows
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        u = rng.uniform_for_sigma(idx, seed, rng.DATA_BLOCK, epoch).numpy()
        shift = np.minimum((u * stride).astype(np.int64), stride - 1)
        return np.minimum(idx.numpy() * stride + shift, num_tokens - seq_len)

    @classmethod
    def for_block(cls, store: store_mod.Store | str | os.PathLike[str], block: int, batch_size: int,
                  arrays: Sequence[str] = (layout.IMAGES, layout.LABELS), gaussians: int | None = None,
                  uniforms: int = 1, **kw: Any) -> BatchStream:
        """Stream `arrays` plus block `block`'s noise: the cached draw `epoch % K` (`noised_z_b{b}`,
        `noised_sigma_b{b}`) or, for an online store, `gaussians` normals (None: the target
        embedding's width) per sample; in both cases `uniforms` uniforms per sample (uniform 0
        picks sigma online; others serve the recipe, e.g. a class drop), seeded by the store's
        noise seed. `dbcore.method.noise.block_noise` turns a batch into (z, sigma)."""
        s = store if isinstance(store, store_mod.Store) else store_mod.open(store)
        noise = s.attrs.get("noise", {})
        names = list(arrays)
        if noise.get("draws"):
            z, sig = layout.noised_z(block), layout.noised_sigma(block)
            extra = (int(noise.get("seed", 0)), block, 0, uniforms) if uniforms else None
            return cls(s, [*names, z, sig], batch_size, draw=[z, sig], noise=extra, **kw)
        if gaussians is None:
            if layout.TARGET_EMBEDDING not in s.arrays():
                raise ValueError(f"{s.path}: no {layout.TARGET_EMBEDDING!r} array to size the "
                                 "Gaussians by: pass gaussians=")
            gaussians = s.info(layout.TARGET_EMBEDDING).shape[1]
        return cls(s, names, batch_size,
                   noise=(int(noise.get("seed", 0)), block, gaussians, uniforms), **kw)


__all__ = ["BatchStream", "EPS", "INDEX", "STREAM_MAX_THREADS", "UNIFORMS"]
