"""Every kernel source compiles with NVRTC (no GPU needed), without warnings, to all entry points."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch

from dbcore.kernels.sources import ENTRY_POINTS, KERNEL_FILES, expanded_source, source_dir


def _nvrtc():
    try:
        from cuda.bindings import nvrtc

        err, _major, _minor = nvrtc.nvrtcVersion()
    except (ImportError, OSError, RuntimeError) as exc:  # no wheel, or libnvrtc not loadable
        pytest.skip(f"NVRTC can't be loaded: {exc}")
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        pytest.skip(f"NVRTC can't be loaded: {err!r}")


def test_sources_ship_in_package():
    names = {p.name for p in source_dir().iterdir()}
    assert set(KERNEL_FILES) <= names
    assert {"dbcore_math.cuh", "philox.cuh", "noise.cuh", "reduce.cuh", "host_harness.cpp"} <= names
    assert '#include "' not in expanded_source("noise.cu")


@pytest.mark.parametrize("arch", ["compute_90", "compute_80"])
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_compiles(name, arch):
    _nvrtc()
    from dbcore.kernels.nvrtc import nvrtc_compile

    res = nvrtc_compile(name, arch=arch, extra=("--Wreorder",))
    assert res.ok, res.log
    assert "warning" not in res.log.lower(), res.log
    for entry in ENTRY_POINTS[name]:
        assert f".entry {entry}(".encode() in res.ptx, entry


def _ptx_params(ptx: str, entry: str) -> list[str]:
    """Param widths of one .entry in PTX, e.g. ['u64', 'u32', 'f64']."""
    m = re.search(rf"\.entry {entry}\((.*?)\)", ptx, re.S)
    assert m, entry
    return re.findall(r"\.param \.(\w+)", m.group(1))


def _arg_width(a) -> str:
    if a is None or isinstance(a, torch.Tensor):
        return "u64"  # a pointer
    return {np.int64: "u64", np.uint64: "u64", np.int32: "u32", np.uint32: "u32",
            np.float64: "f64"}[type(a)]


def test_launch_arguments_match_kernel_signatures(monkeypatch):
    """The Python side passes each kernel the parameters its PTX entry declares, in width."""
    _nvrtc()
    from dbcore.kernels import functions
    from dbcore.kernels.nvrtc import nvrtc_compile

    ptx = {f: nvrtc_compile(f).ptx.decode() for f in KERNEL_FILES}
    calls: list[tuple[str, tuple]] = []
    monkeypatch.setattr(functions, "torch_stream", lambda device: contextlib.nullcontext(0))
    monkeypatch.setattr(functions, "launch", lambda name, dev, grid, args: calls.append((name, args)))
    y = torch.randn(3, 8)
    functions.NoiseAndInput.apply(y, torch.arange(3), 1, 0, 0, 0.1, 1.0, "lognormal")
    z, f = torch.randn(3, 8), torch.randn(3, 8, requires_grad=True)
    functions.MSELoss.apply(z, f, y, torch.ones(3), torch.ones(3)).sum().backward()
    logits = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True)
    functions.CELoss.apply(logits, torch.tensor([0, 1, 2]), torch.ones(3)).sum().backward()
    names = {name for name, _ in calls}
    assert names == {"dbc_noise_f32", "dbc_mse_partial_f32", "dbc_mse_finalize",
                     "dbc_mse_backward_f32", "dbc_ce_forward_bf16", "dbc_ce_backward_bf16"}
    for name, args in calls:
        file = next(fl for fl, entries in ENTRY_POINTS.items() if name in entries)
        assert [_arg_width(a) for a in args] == _ptx_params(ptx[file], name), name
