"""Type stub of the Rust extension `dbcore._native` (see rust/src/python.rs)."""

from os import PathLike
from typing import final

import numpy as np

__all__ = [
    "NativeStore",
    "NativeWriter",
    "NativeStream",
    "BatchBuffer",
    "philox4x32",
    "gaussian",
    "uniform_for_sigma",
    "uniforms",
    "decode_images",
    "configure_cache",
    "RemoteLock",
    "STREAM_MAX_THREADS",
    "STREAM_DEFAULT_THREADS",
    "NativeError",
    "FORMAT_VERSION",
]

FORMAT_VERSION: int

class NativeError(Exception):
    """Raised with args `(kind, message)`; `dbcore.data.store` turns it into a `StoreError`."""

@final
class NativeStore:
    @staticmethod
    def create(path: str | PathLike[str], attrs_json: str, overwrite: bool) -> NativeStore: ...
    @staticmethod
    def open(path: str | PathLike[str], require_complete: bool) -> NativeStore: ...
    @staticmethod
    def exists(path: str | PathLike[str]) -> bool: ...
    @property
    def path(self) -> str: ...
    def get_bytes(self, name: str) -> bytes | None: ...
    def set_bytes(self, name: str, data: bytes) -> None: ...
    def erase(self, name: str) -> None: ...
    def stored_bytes(self, name: str) -> int: ...
    def attrs_json(self) -> str: ...
    def array_names(self) -> list[str]: ...
    def array_info_json(self, name: str) -> str: ...
    def create_array(
        self,
        name: str,
        shape: list[int],
        dtype: str,
        chunk_rows: int | None = None,
        shard_rows: int | None = None,
        compression: str = "zstd",
        level: int = 3,
    ) -> None: ...
    def write_rows(self, name: str, start: int, block: np.ndarray) -> None: ...
    def read_range_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None: ...
    def read_rows_into(self, name: str, rows: np.ndarray, out: np.ndarray) -> None: ...
    def writer(self, name: str) -> NativeWriter: ...
    def finalize(self) -> None: ...

@final
class NativeWriter:
    def write(self, start: int, block: np.ndarray) -> None: ...
    def flush(self) -> None: ...
    @property
    def pending_rows(self) -> int: ...

STREAM_MAX_THREADS: int
STREAM_DEFAULT_THREADS: int

@final
class NativeStream:
    """Batch reader over one store (rust/src/stream/); `dbcore.data.stream.BatchStream` wraps it.

    `path`: an open `NativeStore` (streamed as it was opened, nothing reopened), or the path or
    s3:// URL of a complete store to open.
    """

    def __new__(
        cls,
        path: NativeStore | str | PathLike[str],
        arrays: list[str],
        draws: list[bool],
        batch_size: int,
        shuffle: str = "chunks",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        chunk_rows: int | None = None,
        window_chunks: int | None = None,
        window_bytes: int | None = None,
        threads: int | None = None,
        prefetch: int = 4,
        worker: int = 0,
        num_workers: int = 1,
        noise: tuple[int, int, int, int] | None = None,
        windows: tuple[int, int, bool] | None = None,
    ) -> NativeStream: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def num_batches(self) -> int: ...
    @property
    def num_rank_samples(self) -> int: ...
    @property
    def chunk_rows(self) -> int: ...
    @property
    def window_chunks(self) -> int: ...
    @property
    def threads(self) -> int: ...
    def outputs(self) -> list[tuple[str, list[int], str]]: ...
    def order(self, epoch: int) -> tuple[np.ndarray, list[int]]: ...
    def start(self, epoch: int, position: int) -> None: ...
    def next(
        self,
    ) -> (
        tuple[int, int, np.ndarray, list[np.ndarray], np.ndarray | None, np.ndarray | None] | None
    ): ...
    def stop(self) -> None: ...

@final
class BatchBuffer:
    """Owns one batch buffer while NumPy arrays view it, then gives it back to its stream's pool."""

def philox4x32(ctr: list[int], key: list[int]) -> list[int]: ...
def gaussian(samples: np.ndarray, num_elements: int, seed: int, block: int, draw: int) -> np.ndarray: ...
def uniform_for_sigma(samples: np.ndarray, seed: int, block: int, draw: int) -> np.ndarray: ...
def uniforms(samples: np.ndarray, count: int, seed: int, block: int, draw: int) -> np.ndarray: ...
def decode_images(blobs: list[bytes], size: int, channels: int, out: np.ndarray) -> list[tuple[int, str]]: ...
def configure_cache(
    directory: str | None = None, limit: int | None = None, reset: bool = False
) -> tuple[str, int]: ...

@final
class RemoteLock:
    def __new__(cls, location: str, what: str, lease_seconds: float, force: bool = False) -> RemoteLock: ...
    def release(self) -> None: ...
    @property
    def url(self) -> str: ...
