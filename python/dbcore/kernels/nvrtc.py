"""Compile the kernel sources with NVRTC (no GPU needed): the CI check of every `.cu` file."""

from __future__ import annotations

from dataclasses import dataclass

from dbcore.kernels.sources import expanded_source

NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17", "--device-as-default-execution-space")


@dataclass(frozen=True)
class CompileResult:
    ok: bool
    log: str
    ptx: bytes


def nvrtc_compile(name: str, arch: str = "compute_90", extra: tuple[str, ...] = ()) -> CompileResult:
    """Compile kernel file `name` to PTX for `arch`; raises ImportError if NVRTC can't be loaded."""
    from cuda.bindings import nvrtc  # the cuda-bindings wheel that torch's CUDA build installs

    def check(ret: tuple) -> tuple:
        if ret[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC call failed: {ret[0]!r}")
        return ret[1:]

    src = expanded_source(name).encode()
    (prog,) = check(nvrtc.nvrtcCreateProgram(src, name.encode(), 0, [], []))
    try:
        opts = [o.encode() for o in (f"--gpu-architecture={arch}", *NVRTC_OPTIONS, *extra)]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        (size,) = check(nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, log))
        ok = status == nvrtc.nvrtcResult.NVRTC_SUCCESS
        ptx = b""
        if ok:
            (psize,) = check(nvrtc.nvrtcGetPTXSize(prog))
            ptx = b" " * psize
            check(nvrtc.nvrtcGetPTX(prog, ptx))
        return CompileResult(ok, log.rstrip(b"\x00 ").decode(errors="replace"), ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
