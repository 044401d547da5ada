"""ctypes harness of `cuda/host_harness.cpp`: the kernels' per-element math built with g++.

Used by the tests on machines without a GPU. `host_library()` compiles once per process into a
temporary folder and raises `HostCompilerMissing` when no C++ compiler is found.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from dbcore.kernels.sources import HOST_HARNESS, expanded_source

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_U32 = ctypes.c_uint32
_F64 = ctypes.c_double

_SIGNATURES: dict[str, list] = {
    "dbc_h_philox": [_P, _I64, _U32, _U32, _P],
    "dbc_h_gaussian": [_P, _I64, _I64, _U32, _U32, _U32, _U32, _P],
    "dbc_h_ndtri": [_P, _I64, _P],
    "dbc_h_bf16": [_P, _I64, _P],
    "dbc_h_noise_f32": [_P] * 5 + [_I64, _I64] + [_U32] * 4 + [ctypes.c_int] + [_F64] * 5,
    "dbc_h_noise_bf16": [_P] * 5 + [_I64, _I64] + [_U32] * 4 + [ctypes.c_int] + [_F64] * 5,
    "dbc_h_mse_forward": [_P] * 5 + [_I64, _I64, _F64, _P, _P],
    "dbc_h_mse_backward": [_P] * 6 + [_I64, _I64, _F64, _P, _P, _P],
    "dbc_h_ce_forward": [_P] * 3 + [_I64, _I64, ctypes.c_int, _P, _P, _P],
    "dbc_h_ce_backward": [_P] * 5 + [_I64, _I64, _P],
}


class HostCompilerMissing(RuntimeError):
    """No C++ compiler to build the host test library."""


def _ptr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous
    return a.ctypes.data


@functools.lru_cache(maxsize=1)
def host_library() -> HostLib:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise HostCompilerMissing("no C++ compiler (g++ or $CXX) to build the host kernel library")
    src = expanded_source(HOST_HARNESS)
    tag = hashlib.sha256(src.encode()).hexdigest()[:12]
    folder = Path(tempfile.mkdtemp(prefix="dbcore-host-"))
    cpp, lib = folder / f"harness_{tag}.cpp", folder / f"libdbc_host_{tag}.so"
    cpp.write_text(src)
    cmd = [cxx, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"]
    proc = subprocess.run([*cmd, "-o", str(lib), str(cpp)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"host kernel library failed to build:\n{proc.stderr}")
    return HostLib(ctypes.CDLL(str(lib)))


def _key(seed: int) -> tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


class HostLib:
    """numpy wrappers of the host library; arrays in, arrays out."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None

    def philox(self, ctr: np.ndarray, seed: int) -> np.ndarray:
        """(n, 4) uint32 counters -> (n, 4) uint32 outputs."""
        ctr = np.ascontiguousarray(ctr, dtype=np.uint32)
        out = np.empty_like(ctr)
        self._lib.dbc_h_philox(_ptr(ctr), len(ctr), *_key(seed), _ptr(out))
        return out

    def gaussian(self, sample: np.ndarray, e: int, seed: int, block: int, draw: int) -> np.ndarray:
        sample = np.ascontiguousarray(sample, dtype=np.int64)
        out = np.empty((len(sample), e), dtype=np.float32)
        self._lib.dbc_h_gaussian(_ptr(sample), len(sample), e, *_key(seed), block, draw, _ptr(out))
        return out

    def ndtri(self, p: np.ndarray) -> np.ndarray:
        p = np.ascontiguousarray(p, dtype=np.float64)
        out = np.empty_like(p)
        self._lib.dbc_h_ndtri(_ptr(p), p.size, _ptr(out))
        return out

    def bf16_bits(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(x.shape, dtype=np.uint16)
        self._lib.dbc_h_bf16(_ptr(x), x.size, _ptr(out))
        return out

    def noise(
        self,
        y: np.ndarray,
        sample: np.ndarray,
        seed: int,
        block: int,
        draw: int,
        dist: int,
        a: float,
        b: float,
        p_mean: float,
        p_std: float,
        sd: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """y (n, e) float32, or uint16 holding bfloat16 bits -> (z, c_in_z, sigma)."""
        y = np.ascontiguousarray(y)
        fn = self._lib.dbc_h_noise_f32 if y.dtype == np.float32 else self._lib.dbc_h_noise_bf16
        assert y.dtype in (np.float32, np.uint16)
        sample = np.ascontiguousarray(sample, dtype=np.int64)
        z, cz, sigma = np.empty_like(y), np.empty_like(y), np.empty(len(y), dtype=np.float32)
        n, e = y.shape
        fn(_ptr(y), _ptr(z), _ptr(cz), _ptr(sigma), _ptr(sample), n, e, *_key(seed), block, draw,
           dist, a, b, p_mean, p_std, sd)
        return z, cz, sigma

    def mse_forward(self, z, f, y, sigma, w, sd: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample (mse, w*mse) for (n, e) float32 arrays."""
        z, f, y, sigma, w = (np.ascontiguousarray(a, dtype=np.float32) for a in (z, f, y, sigma, w))
        n, e = z.shape
        mse, loss = np.empty(n, np.float32), np.empty(n, np.float32)
        self._lib.dbc_h_mse_forward(*map(_ptr, (z, f, y, sigma, w)), n, e, sd, _ptr(mse), _ptr(loss))
        return mse, loss

    def mse_backward(self, z, f, y, sigma, w, g, sd: float) -> tuple[np.ndarray, ...]:
        """(grad F, grad z, grad y) for upstream per-sample grads g."""
        arrs = [np.ascontiguousarray(a, dtype=np.float32) for a in (z, f, y, sigma, w, g)]
        n, e = arrs[0].shape
        gf, gz, gy = (np.empty((n, e), np.float32) for _ in range(3))
        self._lib.dbc_h_mse_backward(*map(_ptr, arrs), n, e, sd, _ptr(gf), _ptr(gz), _ptr(gy))
        return gf, gz, gy

    def ce_forward(self, logits, labels, w, threads: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Per-row (w*CE, stats (n, 2) = (max, ln sum exp(x - max))), each row reduced as a
        block of `threads` threads would."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        w = np.ascontiguousarray(w, dtype=np.float32)
        n, v = logits.shape
        scratch = np.empty(2 * threads, np.float32)
        loss, stats = np.empty(n, np.float32), np.empty((n, 2), np.float32)
        self._lib.dbc_h_ce_forward(_ptr(logits), _ptr(labels), _ptr(w), n, v, threads,
                                   _ptr(scratch), _ptr(loss), _ptr(stats))
        return loss, stats

    def ce_backward(self, logits, labels, stats, w, g) -> np.ndarray:
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        stats, w, g = (np.ascontiguousarray(a, dtype=np.float32) for a in (stats, w, g))
        n, v = logits.shape
        grad = np.empty((n, v), np.float32)
        self._lib.dbc_h_ce_backward(*map(_ptr, (logits, labels, stats, w, g)), n, v, _ptr(grad))
        return grad
