"""One block trained data-parallel under torchrun (gloo on CPU): what N processes train equals
what one process at the same global batch trains; resume across world sizes; one-line errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbcore import api
from dbcore.data.stream import BatchStream
from dbcore.errors import RunError
from dbcore.runs import checkpoint, rundir

HERE = Path(__file__).parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
TOML = """
[model]
recipe = "vit"
image_size = 8
channels = 1
patch_size = 2
dim = 32
depth = 2
heads = 2
num_classes = 10
num_blocks = 2

[train]
steps = 24
batch_size = 32
warmup_steps = 4
checkpoint_every = 8
threads = 1
device = "cpu"
"""


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    cfg = d / "vit.toml"
    cfg.write_text(TOML)
    api.cache(api.config(cfg), "digits:train", d / "c.zarr")
    return cfg, d / "c.zarr"


def _run(*args: str, ranks: int = 1, program: tuple[str, ...] = ("-m", "dbcore"), check: bool = True
         ) -> subprocess.CompletedProcess:
    """`python PROGRAM ARGS`, or under torchrun with `ranks` processes (gloo, one thread each)."""
    launch = [sys.executable] if ranks == 1 else [str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*launch, *program, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too: nothing left behind
        raise
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check and out.returncode != 0:
        raise AssertionError(f"{program} {args} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    tensors, _ = checkpoint.load(run / name, prefix="model.")
    return tensors


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-3) -> float:
    """The largest difference of two models' tensors relative to each tensor's largest value."""
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max().clamp_min(1e-12))
                for k in a)
    assert worst < tol, worst
    return worst


def test_python_dash_m_dbcore_is_the_cli():
    out = _run("--version")
    assert out.stdout.startswith("dbcore")


def test_two_processes_train_what_one_trains_and_rank_zero_alone_writes(cached, tmp_path):
    cfg, store = cached
    _run("train", str(cfg), "--store", str(store), "--out", str(tmp_path / "one"), "--block", "0", "--quiet")
    _run("train", str(cfg), "--store", str(store), "--out", str(tmp_path / "two"), "--block", "0", "--quiet",
         ranks=2)
    _close(_weights(tmp_path / "one", "block0"), _weights(tmp_path / "two", "block0"))
    steps = {run: [json.loads(x)["step"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("one", "two")}
    assert steps["two"] == steps["one"]  # one writer: each logged step once
    meta = json.loads((tmp_path / "two" / "block0.json").read_text())
    assert meta["stream"]["world_size"] == 2 and meta["stream"]["batch_size"] == 16


def test_the_first_step_sees_the_gradient_of_the_global_batch(cached, tmp_path):
    """Before Adam can amplify rounding: the gradient DDP averages over 2 processes equals the
    one process's gradient of the same global batch, tensor by tensor."""
    from safetensors.torch import load_file

    cfg, store = cached
    save = str(HERE / "helpers" / "save_first_gradients.py")
    args = ["train", str(cfg), "--store", str(store), "--block", "0", "--quiet"]
    _run(*args, "--out", str(tmp_path / "one"), program=(save, str(tmp_path / "one.safetensors")))
    _run(*args, "--out", str(tmp_path / "two"), ranks=2, program=(save, str(tmp_path / "two.safetensors")))
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys() and len(one) > 10
    _close(one, two, tol=1e-6)  # float32 rounding of a mean taken in another order


def test_a_run_killed_with_two_processes_resumes_with_one(cached, tmp_path):
    cfg, store = cached
    args = ["train", str(cfg), "--store", str(store), "--block", "0", "--quiet"]
    _run(*args, "--out", str(tmp_path / "full"))
    crashed = _run(*args, "--out", str(tmp_path / "run"), ranks=2,
                   program=(str(HERE / "helpers" / "crash_at_step.py"), "13"), check=False)
    assert crashed.returncode != 0
    meta = json.loads((tmp_path / "run" / "block0.json").read_text())
    assert meta["step"] == 8 and not meta["done"]  # the first checkpoint, then the crash at step 13
    _run(*args, "--out", str(tmp_path / "run"))  # one process takes it from there
    _close(_weights(tmp_path / "full", "block0"), _weights(tmp_path / "run", "block0"))


def test_a_rank_that_dies_is_restarted_by_torchrun_and_the_job_resumes(cached, tmp_path):
    """`torchrun --max-restarts 1`: the last rank dies at step 13 in the first attempt, the other
    fails on its closed connection, torchrun restarts both and they resume from step 8."""
    cfg, store = cached
    args = ["train", str(cfg), "--store", str(store), "--block", "0", "--quiet"]
    _run(*args, "--out", str(tmp_path / "full"))
    restarted = _run("--max-restarts", "1", str(HERE / "helpers" / "crash_at_step.py"), "13", *args, "--out",
                     str(tmp_path / "run"), ranks=2, program=())
    assert "crash at step 13" in restarted.stderr and json.loads(restarted.stdout)["resumed_at"] == 8
    _close(_weights(tmp_path / "full", "block0"), _weights(tmp_path / "run", "block0"))


def test_bad_world_sizes_and_blocks_get_one_line(cached, tmp_path):
    cfg, store = cached
    odd = tmp_path / "odd.toml"
    odd.write_text(TOML.replace("batch_size = 32", "batch_size = 33"))
    out = _run("train", str(odd), "--store", str(store), "--out", str(tmp_path / "r"), "--quiet", ranks=2,
               check=False)
    assert out.returncode != 0
    assert "batch_size 33 is the global batch: the world size 2 must divide it" in out.stderr
    out = _run("train", str(cfg), "--store", str(store), "--out", str(tmp_path / "r"), "--block", "5",
               "--quiet", ranks=2, check=False)
    assert out.returncode != 0 and "--block 5 is outside 0..1" in out.stderr
    frames = [line for line in out.stderr.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "/dbcore/" in f]  # torchrun's own report only: no trace from dbcore


def test_a_checkpoint_another_job_trains_is_refused(cached, tmp_path):
    cfg, store = cached
    with rundir.writing(tmp_path / "run", "block0"):
        with pytest.raises(RunError, match="another process .* is writing this checkpoint of run"):
            api.train(api.config(cfg), store, tmp_path / "run", block=0, progress=False)
    api.train(api.config(cfg), store, tmp_path / "run", block=0, progress=False)  # released


def test_a_stream_position_carries_over_world_sizes_of_one_global_batch(cached):
    _, store = cached
    two = BatchStream(store, ["images", "labels"], 16, rank=1, world_size=2, drop_last=True)
    state = {**two.state_dict(), "epoch": 1, "position": 5}
    one = BatchStream(store, ["images", "labels"], 32, drop_last=True)
    one.load_state_dict(state)
    assert (one.epoch, one.position) == (1, 5)
    with pytest.raises(ValueError, match="global batch of 32 .* this stream 16"):
        BatchStream(store, ["images", "labels"], 16, drop_last=True).load_state_dict(state)
