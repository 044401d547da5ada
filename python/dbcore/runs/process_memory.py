"""`dbcore bench memory --store STORE`: what a user's `dbcore train` process holds.

For the end-to-end baseline and each block, a short real `train` over the real store runs in a
child process (`--steps`, a fresh run directory); its anonymous resident memory (RssAnon: heap,
tensors, buffers; not the mapped store or libraries) is sampled every `POLL_S` seconds and its peak
kept. The fixed share is the peak of a child that imports torch and dbcore, opens the store and
takes one AdamW step on one parameter: torch loads its optimizer machinery (about 80 MiB of
compiler modules) on the first step of any process, whatever the model; each peak less that
share is what training itself holds. On CUDA (`device="cuda"`) each child also reports the
device's `max_memory_allocated` when it ends (`DEVICE_PEAK_CHILD`), the fixed share's child takes
its step on the device, and a peak is the device's plus the host's RssAnon.

Allocator: "default" is glibc as a user's process gets it (freed heap may stay resident); "tight"
runs the children with glibc's mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`), as the
model step's "tight" does, so that the difference between the two is the allocator's caching.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dbcore.data.location import Location

POLL_S = 0.01
PROCESS_STEPS = 60
ALLOCATOR_ENV = {"default": {}, "tight": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
FIXED_SHARE = ("import sys, torch, dbcore.runs.train, dbcore.data.store as s; s.open(sys.argv[1]); "
               "w = torch.zeros(1, requires_grad=True, device=sys.argv[2]); w.sum().backward(); "
               "torch.optim.AdamW([w]).step()")
# `python -c DEVICE_PEAK_CHILD PEAK_FILE (-c CODE | MODULE) ARGS...` runs the code or module as
# `python -c`/`-m` would, then writes the CUDA device's max_memory_allocated (bytes) to PEAK_FILE
DEVICE_PEAK_CHILD = (
    "import runpy, sys, torch\n"
    "peak_file, sys.argv = sys.argv[1], sys.argv[2:]\n"
    "try:\n"
    "    if sys.argv[0] == '-c':\n"
    "        code, sys.argv = sys.argv[1], ['-c', *sys.argv[2:]]\n"
    "        exec(code, {'__name__': '__main__'})\n"
    "    else:\n"
    "        runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "finally:\n"
    "    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0\n"
    "    open(peak_file, 'w').write(str(peak))\n"
)


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory field of a process's `/proc/PID/status` (VmRSS, VmHWM, RssAnon...) in bytes; an
    OSError once the process is gone, a LookupError while it has no memory (a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"/proc/{pid}/status has no {field}")


def peak_rss_anon(cmd: list[str], allocator: str = "default") -> int:
    """The peak RssAnon of a child running `cmd`, sampled until it exits; a failure raises with
    the tail of its output."""
    env = {**os.environ, **ALLOCATOR_ENV[allocator]}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, status_bytes("RssAnon", proc.pid))
        except (OSError, LookupError):  # exiting, or between two images in exec: no sample
            pass
        time.sleep(POLL_S)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}):\n{out[-2000:]}")
    return peak


def peak_of(args: list[str], allocator: str, device: str) -> tuple[int, int]:
    """(host RssAnon peak, device max allocated) of a child `python ARGS` (`-c CODE ...` or
    `-m MODULE ...`); the device's is 0 on CPU."""
    if device == "cpu":
        return peak_rss_anon([sys.executable, *args], allocator), 0
    with tempfile.TemporaryDirectory(prefix="dbcore-bench-") as tmp:
        peak_file = Path(tmp) / "device_peak"
        program = args if args[0] == "-c" else args[1:]  # -m MODULE ... -> MODULE ...
        host = peak_rss_anon([sys.executable, "-c", DEVICE_PEAK_CHILD, str(peak_file), *program], allocator)
        return host, int(peak_file.read_text())


def measure_process(config_path: str | Path, store: Location, num_blocks: int, steps: int = PROCESS_STEPS,
                    allocator: str = "default", device: str = "cpu") -> dict:
    """Peak memory of a short `train` of the baseline and of each block, and the fixed share: host
    RssAnon, plus on CUDA the device's max allocated (the train picks the device itself, so pass
    the device it will use)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if allocator not in ALLOCATOR_ENV:
        raise ValueError(f"allocator must be one of {sorted(ALLOCATOR_ENV)}, got {allocator!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    host, dev = {}, {}
    host["fixed"], dev["fixed"] = peak_of(["-c", FIXED_SHARE, str(store), device], allocator, device)
    for kind in ["e2e", *[f"block{b}" for b in range(num_blocks)]]:
        with tempfile.TemporaryDirectory(prefix="dbcore-bench-") as run:
            which = ["--e2e"] if kind == "e2e" else ["--block", kind.removeprefix("block")]
            train = ["-m", "dbcore.cli", "train", str(config_path), "--store", str(store), "--out", run,
                     "--steps", str(steps), "--quiet", *which]
            host[kind], dev[kind] = peak_of(train, allocator, device)
    peaks = {k: host[k] + dev[k] for k in host}
    fixed = peaks["fixed"]
    blocks = [peaks[f"block{b}"] for b in range(num_blocks)]
    beyond = max(blocks) - fixed
    device_peaks = {"device_e2e_peak_bytes": dev["e2e"],
                    "device_block_peak_bytes": [dev[f"block{b}"] for b in range(num_blocks)],
                    "device_fixed_bytes": dev["fixed"]} if device == "cuda" else {}
    return {
        "steps": steps,
        "allocator": allocator,
        "device": device,
        "fixed_bytes": fixed,
        "e2e_peak_bytes": peaks["e2e"],
        "block_peak_bytes": blocks,
        **device_peaks,
        "max_block_over_e2e": max(blocks) / peaks["e2e"],
        "max_block_over_e2e_beyond_fixed": beyond / max(1, peaks["e2e"] - fixed),
    }
