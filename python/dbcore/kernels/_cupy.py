"""CuPy side: lazy import, NVRTC module cache, launches on PyTorch's current stream via DLPack."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from dbcore.kernels.nvrtc import NVRTC_OPTIONS
from dbcore.kernels.sources import ENTRY_POINTS, expanded_source

THREADS = 256
MAX_GRID_Y = 65535


class BackendUnavailable(RuntimeError):
    """The requested kernel backend can't run here (no CuPy, no CUDA device, ...)."""


@functools.lru_cache(maxsize=1)
def import_cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailable(
            "backend 'cupy' needs CuPy: install the cuda extra (pip install 'dbcore[cuda]', "
            f"which brings cupy-cuda13x); import failed with: {exc}"
        ) from exc
    return cupy


def cupy_available() -> bool:
    try:
        import_cupy()
    except BackendUnavailable:
        return False
    return True


@functools.cache
def _module(file: str, device: int) -> Any:
    cp = import_cupy()
    with cp.cuda.Device(device):
        return cp.RawModule(code=expanded_source(file), options=NVRTC_OPTIONS, backend="nvrtc")


def kernel(name: str, device: int) -> Any:
    file = next(f for f, names in ENTRY_POINTS.items() if name in names)
    return _module(file, device).get_function(name)


@contextmanager
def torch_stream(device: torch.device):
    """Make CuPy run on PyTorch's current stream of `device` (no extra synchronisation)."""
    cp = import_cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cp.cuda.Device(index):
        stream = cp.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream, index)
        with stream:
            yield index


def as_cupy(t: torch.Tensor | None) -> Any:
    """Zero-copy CuPy view of a CUDA tensor (DLPack); None is passed as a null pointer."""
    if t is None:
        return np.uint64(0)
    if t.dtype == torch.bfloat16:  # CuPy may lack bfloat16; the kernels read the raw 16 bits
        t = t.view(torch.int16)
    return import_cupy().from_dlpack(t.detach())


def launch(name: str, device: int, grid: tuple[int, ...], args: tuple) -> None:
    """Launch `name` with THREADS threads a block; tensors become CuPy views."""
    cargs = tuple(as_cupy(a) if isinstance(a, torch.Tensor) or a is None else a for a in args)
    kernel(name, device)(grid, (THREADS,), cargs)


def suffix(dtype: torch.dtype) -> str:
    """Kernel suffix of a dtype the kernels read natively."""
    if dtype == torch.float32:
        return "f32"
    if dtype == torch.bfloat16:
        return "bf16"
    raise TypeError(f"CuPy kernels take float32 or bfloat16 tensors, got {dtype}")


def sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
