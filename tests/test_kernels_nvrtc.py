"""Every kernel source compiles with NVRTC (no GPU needed), without warnings, to all entry points."""

from __future__ import annotations

import pytest

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
