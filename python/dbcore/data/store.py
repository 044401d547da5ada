"""Zarr v3 stores of cached activations and targets, written and read in Rust (`dbcore._native`).

A store is one Zarr v3 group, in a local folder or at `s3://bucket/prefix` (S3 or any
S3-compatible object store; credentials, region and endpoint from the standard AWS environment
variables, `AWS_ENDPOINT_URL` included). A complete `s3://` store is read through a local disk
cache (`configure_cache`): listed once, each object downloaded whole, once, and read from disk;
entries are named by the object's ETag, so a rewritten store is never served stale.

Each array is chunked along rows (axis 0) and, when it has many chunks, sharded (about 64 MiB
shards of about 1 MiB chunks); zarr-python 3 and any other Zarr v3 reader open it as it is.

Compression (`compression="auto"`, the default): floating-point arrays (activations, noised
targets, embeddings) are stored uncompressed, everything else (images, tokens, labels) with zstd
(level 3, with checksum). Measured by `benches/bench_codec.py` (`benches/results/codec.json`):
on float16 activations zstd at any level and blosc (zstd, byte shuffle) keep about 0.92 of the
bytes and blosc-lz4 none of them, while decoding dominates a shuffled read; uint8 images shrink
to about 0.21 with zstd. `compression="zstd"` or `None` choose for one array.

Uncompressed arrays are the `bytes` codec alone (little-endian), sharded the same way. Reads of
such an array skip decoding: each row is read from its chunk straight into the output
(`BatchStream` reaches a large fraction of memory-copy speed). Uncompressed chunks have no
checksum (the shard index keeps its crc32c): a truncated chunk or shard is reported, a flipped bit
inside one is not.

Crash safety: the group attribute `dbcore` holds `{"format": 1, "complete": false}` from `create`
until `finalize()` rewrites it as `{"format": 1, "complete": true, "arrays": {name: {"shape",
"dtype"}}}`; creating another array sets `complete` back to false. `open` refuses a store that was
never finalized, was written by a newer format, or whose arrays are missing or differ from that
record; `open(path, require_complete=False)` reads any Zarr v3 group (e.g. one written by
zarr-python). Every failure is a `StoreError` naming the store, the array and the problem.

    s = create("acts.zarr", attrs={"model": "vit"})
    s.write_array("x", x)                       # whole array
    s.write_array("acts", a)                    # float: uncompressed (the default for floats)
    w = s.array_writer("h", (n, 256), "float16")
    w.write(0, block)                           # or streamed, block by block
    s.finalize()
    s = open("acts.zarr")
    s.read("h", np.array([7, 3, 9]))            # gather rows
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dbcore import _native
from dbcore.data.location import is_url, parse_location
from dbcore.wording import arg

DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
)
META_KEY = "dbcore"
FORMAT_VERSION: int = _native.FORMAT_VERSION


class StoreError(Exception):
    """Any failure to create, write, open or read a store."""


class StoreExistsError(StoreError, FileExistsError):
    """The store or array already exists."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the path, or no such array in it."""


class IncompleteStoreError(StoreError):
    """The store was never finalized (or is not a dbcore store)."""


class CorruptStoreError(StoreError):
    """Bad metadata, a truncated or corrupt chunk, or arrays that differ from the store's record."""


class DTypeError(StoreError, TypeError):
    """A dtype the store cannot hold, or other than the one expected."""


class StoreIndexError(StoreError, IndexError):
    """Rows out of range."""


class StoreValueError(StoreError, ValueError):
    """A bad argument: shape, name, attributes, chunking."""


_ERRORS: dict[str, type[StoreError]] = {
    "exists": StoreExistsError,
    "not_found": StoreNotFoundError,
    "incomplete": IncompleteStoreError,
    "corrupt": CorruptStoreError,
    "dtype": DTypeError,
    "index": StoreIndexError,
    "invalid": StoreValueError,
    "io": StoreError,
}


@contextmanager
def _native_errors() -> Iterator[None]:
    try:
        yield
    except _native.NativeError as e:
        kind, msg = e.args
        raise _ERRORS.get(kind, StoreError)(msg) from None


@dataclass(frozen=True)
class ArrayInfo:
    """What `dbcore info` shows about one array."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]  # the unit of compression and reading (inner chunk when sharded)
    shards: tuple[int, ...] | None
    codecs: list[dict[str, Any]]
    nbytes: int  # in memory
    nbytes_stored: int  # on disk, metadata included

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def compression(self) -> str | None:
        """The bytes-to-bytes codec of the chunks ("zstd", ...), None when uncompressed."""
        codecs = self.codecs
        if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
            codecs = (codecs[0].get("configuration") or {}).get("codecs", [])
        names = [c["name"] for c in codecs if c["name"] not in ("bytes", "transpose")]
        return ",".join(names) or None


def _native_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.name not in DTYPES:
        raise DTypeError(f"unsupported dtype {dt} (supported: {', '.join(DTYPES)})")
    return dt.newbyteorder("=")


COMPRESSIONS = ("auto", "zstd", None)


def _compression_name(compression: str | None, dtype: np.dtype) -> str:
    """The native codec name; "auto": none for floating-point dtypes, zstd otherwise (module docs)."""
    if compression == "auto":
        return "none" if dtype.kind == "f" else "zstd"
    if compression is None or compression == "none":
        return "none"
    if compression == "zstd":
        return "zstd"
    raise StoreValueError(f"compression must be 'auto', 'zstd' or None, got {compression!r}")


class ArrayWriter:
    """Writes one array in row blocks: `write(rows_start, block)`, any order, larger than memory.

    Rows wait in memory until their shard (or chunk) is whole, so each is compressed once; the rest
    reach disk on `close()` or `Store.finalize()`. Usable as a context manager.
    """

    def __init__(self, store: Store, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.store, self.name, self.shape, self.dtype = store, name, shape, dtype
        with _native_errors():
            self._native = store._native.writer(name)

    def __enter__(self) -> ArrayWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending_rows(self) -> int:
        """Rows written but still in memory."""
        return self._native.pending_rows

    def close(self) -> None:
        """Write every row still in memory (idempotent)."""
        with _native_errors():
            self._native.flush()

    def write(self, rows_start: int, block: np.ndarray) -> None:
        """Write `block` as rows `rows_start .. rows_start + len(block)` (dtype must match)."""
        block = np.asarray(block)
        where = f"{self.store.path}: array {self.name!r}"
        if block.dtype.name != self.dtype.name:
            raise DTypeError(f"{where}: block has dtype {block.dtype}, the array {self.dtype}")
        if block.shape[1:] != self.shape[1:]:
            raise StoreValueError(
                f"{where}: block of shape {block.shape} does not fit rows of shape {self.shape[1:]}"
            )
        if rows_start < 0:
            raise StoreIndexError(f"{where}: negative rows_start {rows_start}")
        block = np.ascontiguousarray(block, dtype=self.dtype)
        with _native_errors():
            self._native.write(rows_start, block)


class Store:
    """An open store. Get one from `create` or `open`; safe to read from several threads."""

    def __init__(self, native: _native.NativeStore) -> None:
        self._native = native
        self.path: Path | str = parse_location(native.path)  # an s3:// store: its URL
        self._writers: list[ArrayWriter] = []

    @property
    def native(self) -> _native.NativeStore:
        """The extension's handle of the open store, which a stream shares (no second open)."""
        return self._native

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"<dbcore.data.store.Store {str(self.path)!r} ({state}, arrays: {self.arrays()})>"

    def _all_attrs(self) -> dict[str, Any]:
        return json.loads(self._native.attrs_json())

    @property
    def attrs(self) -> dict[str, Any]:
        """The user's group attributes (dbcore's own `dbcore` key left out)."""
        return {k: v for k, v in self._all_attrs().items() if k != META_KEY}

    @property
    def complete(self) -> bool:
        meta = self._all_attrs().get(META_KEY)
        return isinstance(meta, dict) and meta.get("complete") is True

    def arrays(self) -> list[str]:
        """Names of the arrays in the store, sorted."""
        with _native_errors():
            return self._native.array_names()

    def info(self, name: str) -> ArrayInfo:
        with _native_errors():
            d = json.loads(self._native.array_info_json(name))
        shape = tuple(d["shape"])
        return ArrayInfo(
            name=name,
            shape=shape,
            dtype=d["dtype"],
            chunks=tuple(d["chunks"]),
            shards=tuple(d["shards"]) if d["shards"] else None,
            codecs=d["codecs"],
            nbytes=int(np.prod(shape, dtype=np.int64)) * np.dtype(d["dtype"]).itemsize,
            nbytes_stored=self._native.stored_bytes(name),
        )

    def array_writer(
        self,
        name: str,
        shape: Sequence[int],
        dtype: Any,
        chunks: int | Sequence[int] | None = None,
        shards: int | None = None,
        level: int = 3,
        compression: str | None = "auto",
    ) -> ArrayWriter:
        """Create array `name` (see `create_array`) and return a writer for it."""
        self.create_array(name, shape, dtype, chunks, shards, level, compression)
        w = ArrayWriter(self, name, tuple(int(d) for d in shape), _native_dtype(dtype))
        self._writers.append(w)
        return w

    def create_array(
        self,
        name: str,
        shape: Sequence[int],
        dtype: Any,
        chunks: int | Sequence[int] | None = None,
        shards: int | None = None,
        level: int = 3,
        compression: str | None = "auto",
    ) -> None:
        """Create the empty array `name`; write it with `ArrayWriter`s, from any process.

        `chunks`: rows per chunk (default: about 1 MiB), or a full chunk shape whose other axes
        span the array; `shards`: rows per shard, a multiple of `chunks` (default: about 64 MiB
        when there are 16 chunks or more; 0: no sharding); `compression`: "auto" (uncompressed
        floats, zstd for the rest), "zstd" (at `level`) or None (uncompressed: the bytes codec
        alone, no checksum); see the module docs.
        """
        dt = _native_dtype(dtype)
        codec = _compression_name(compression, dt)
        shape = tuple(int(d) for d in shape)
        if chunks is not None and not isinstance(chunks, (int, np.integer)):
            chunks = tuple(int(c) for c in chunks)
            if chunks[1:] != shape[1:]:
                raise StoreValueError(
                    f"{self.path}: array {name!r}: chunks {chunks} must span every axis but the "
                    f"first (shape {shape}); dbcore chunks along rows only"
                )
            chunks = chunks[0]
        if (chunks is not None and chunks < 1) or (shards is not None and shards < 0):
            raise StoreValueError(f"{self.path}: array {name!r}: bad chunks={chunks} shards={shards}")
        with _native_errors():
            self._native.create_array(name, list(shape), dt.name, chunks, shards, codec, level)

    def write_array(
        self,
        name: str,
        array: Any,
        chunks: int | Sequence[int] | None = None,
        shards: int | None = None,
        level: int = 3,
        compression: str | None = "auto",
    ) -> None:
        """Store a whole in-memory array as `name` (see `array_writer` for the layout options)."""
        array = np.asarray(array)
        if array.ndim == 0:
            raise StoreValueError(f"{self.path}: array {name!r}: needs at least one dimension")
        with self.array_writer(name, array.shape, array.dtype, chunks, shards, level,
                               compression) as w:
            w.write(0, array)

    def read(self, name: str, rows: Any = None, dtype: Any = None) -> np.ndarray:
        """Rows of array `name`: all (None), a slice, an int, or an integer array (gather).

        With `dtype`, refuse an array of another dtype instead of returning it.
        """
        with _native_errors():
            d = json.loads(self._native.array_info_json(name))
        shape, dt = tuple(d["shape"]), np.dtype(d["dtype"])
        where = f"{self.path}: array {name!r}"
        if dtype is not None and np.dtype(dtype) != dt:
            raise DTypeError(f"{where}: has dtype {dt}, expected {np.dtype(dtype)}")
        n = shape[0]
        if rows is None:
            rows = slice(None)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                out = np.empty((max(stop - start, 0), *shape[1:]), dtype=dt)
                with _native_errors():
                    self._native.read_range_into(name, start, max(start, stop), out)
                return out
            rows = np.arange(start, stop, step)
        if isinstance(rows, (int, np.integer)):
            return self.read(name, np.array([rows]))[0]
        idx = np.asarray(rows)
        if idx.ndim != 1 or not (idx.dtype.kind in "iu" or idx.size == 0):
            raise StoreValueError(f"{where}: rows must be a slice, an int or a 1-D integer array")
        idx = idx.astype(np.int64, copy=False)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise StoreIndexError(f"{where}: row {bad} out of range for {n} rows")
        out = np.empty((idx.size, *shape[1:]), dtype=dt)
        with _native_errors():
            self._native.read_rows_into(name, idx.astype(np.uint64), out)
        return out

    @property
    def is_local(self) -> bool:
        return isinstance(self.path, Path)

    def read_extra(self, key: str) -> bytes | None:
        """The bytes of a file of the store that is no array (e.g. a writer's ledger), or None."""
        with _native_errors():
            return self._native.get_bytes(key)

    def write_extra(self, key: str, data: bytes) -> None:
        """Write (replace) a file of the store that is no array."""
        with _native_errors():
            self._native.set_bytes(key, data)

    def erase_extra(self, key: str) -> None:
        with _native_errors():
            self._native.erase(key)

    def finalize(self) -> None:
        """Flush every writer, record the arrays' shapes and dtypes, mark the store complete."""
        for w in self._writers:
            w.close()
        self._writers.clear()
        with _native_errors():
            self._native.finalize()


class StoreLockedError(StoreError):
    """Another process is writing the store."""


LOCK_LEASE_SECONDS = 120.0  # an s3:// writer's lease, renewed every third of it while it writes


@contextmanager
def writer_lock(path: str | os.PathLike[str], what: str = "store", break_lock: bool = False,
                breakable: bool = True) -> Iterator[None]:
    """Hold the right to write `path` (a store, or another `what`) for the block's lifetime; a
    second writer is refused with one line naming the holder.

    Local: an exclusive `flock` on `.NAME.lock` beside it, released by the OS if the process dies.
    `s3://`: an object `.NAME.lock` beside it, created by a conditional PUT (`If-None-Match: *`)
    and naming its holder and a lease of `LOCK_LEASE_SECONDS` that a thread renews; a killed
    writer's lock expires with its lease (at once when it ran on this machine), and `break_lock`
    takes a live one over (`breakable`: the refusal says so)."""
    if is_url(path):
        try:
            with _native_errors():
                lock = _native.RemoteLock(os.fspath(path), what, LOCK_LEASE_SECONDS, break_lock)
        except StoreExistsError as e:
            hint = (f"or, if it was killed, pass {arg('break_lock', True)}" if breakable else
                    f"(a killed writer's lock expires within {LOCK_LEASE_SECONDS:.0f} s)")
            raise StoreLockedError(f"{e} {hint}") from None
        try:
            yield
        finally:
            with _native_errors():
                lock.release()
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_file = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_file, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreLockedError(f"{path}: another process (pid {holder}) is writing this {what}; "
                               "wait for it to finish or stop it") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def configure_cache(directory: str | os.PathLike[str] | None = None, limit: int | None = None,
                    reset: bool = False) -> tuple[str, int]:
    """Set the local disk cache of `s3://` stores for stores opened from now on: its folder
    (entries under `DIRECTORY/objects`; default `DBCORE_CACHE_DIR`, else `~/.cache/dbcore`) and its
    limit in bytes (default `DBCORE_CACHE_LIMIT`, else 32 GiB; 0 turns it off); `reset`: back to
    the environment's values. Returns the objects folder and the limit in force."""
    if limit is not None and limit < 0:
        raise StoreValueError(f"cache limit must be >= 0 bytes, got {limit}")
    with _native_errors():
        return _native.configure_cache(None if directory is None else os.fspath(directory), limit, reset)


def create(
    path: str | os.PathLike[str], attrs: dict[str, Any] | None = None, overwrite: bool = False
) -> Store:
    """Create an empty, incomplete store (a Zarr v3 group); `path` must not exist unless `overwrite`."""
    try:
        attrs_json = json.dumps(attrs or {}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreValueError(f"{path}: attributes are not JSON: {e}") from None
    with _native_errors():
        return Store(_native.NativeStore.create(os.fspath(path), attrs_json, overwrite))


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds a Zarr group (complete or not)."""
    with _native_errors():
        return _native.NativeStore.exists(os.fspath(path))


def open(path: str | os.PathLike[str], require_complete: bool = True) -> Store:  # noqa: A001
    """Open a store; `require_complete=False` also reads unfinished stores and foreign Zarr groups."""
    with _native_errors():
        return Store(_native.NativeStore.open(os.fspath(path), require_complete))


__all__ = [
    "ArrayInfo",
    "ArrayWriter",
    "CorruptStoreError",
    "DTypeError",
    "IncompleteStoreError",
    "Store",
    "StoreError",
    "StoreExistsError",
    "StoreIndexError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreValueError",
    "configure_cache",
    "create",
    "exists",
    "open",
    "writer_lock",
]
