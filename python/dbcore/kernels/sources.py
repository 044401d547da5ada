"""The CUDA C++ sources shipped inside the package (`dbcore/kernels/cuda`, a link to `cuda/`)."""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable

KERNEL_FILES: tuple[str, ...] = ("noise.cu", "loss_mse.cu", "loss_ce.cu")
HOST_HARNESS = "host_harness.cpp"

# extern "C" entry points of each kernel file (dtype suffixes f32, bf16).
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "noise.cu": ("dbc_noise_f32", "dbc_noise_bf16"),
    "loss_mse.cu": (
        "dbc_mse_partial_f32",
        "dbc_mse_partial_bf16",
        "dbc_mse_finalize",
        "dbc_mse_backward_f32",
        "dbc_mse_backward_bf16",
    ),
    "loss_ce.cu": (
        "dbc_ce_forward_f32",
        "dbc_ce_forward_bf16",
        "dbc_ce_backward_f32",
        "dbc_ce_backward_bf16",
    ),
}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def source_dir() -> Traversable:
    """The folder holding the .cu/.cuh sources of the installed package."""
    return files("dbcore.kernels").joinpath("cuda")


def read_source(name: str) -> str:
    return source_dir().joinpath(name).read_text(encoding="utf-8")


def expanded_source(name: str) -> str:
    """`name` with its local `#include "..."` headers inlined (each once, like #pragma once).

    Inlining makes the text self-contained: NVRTC needs no include path, and CuPy's compile cache,
    keyed on the source text, sees header edits (it would not hash headers found via -I).
    """
    seen: set[str] = set()

    def expand(file: str) -> str:
        if file in seen:
            return ""
        seen.add(file)
        text = read_source(file).replace("#pragma once", "")
        return _INCLUDE.sub(lambda m: f"// ---- {m.group(1)}\n{expand(m.group(1))}", text)

    return expand(name)
