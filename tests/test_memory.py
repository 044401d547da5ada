import json

import pytest
from click.testing import CliRunner

from dbcore.cli import main
from dbcore.runs.memory import _spawn, measure_all

TOML = """
[model]
image_size = 8
patch_size = 2
dim = 64
depth = 4
heads = 2
num_blocks = 2

[train]
batch_size = 256
"""


def test_bench_memory_measures_every_configuration(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text(TOML)
    out = CliRunner().invoke(main, ["bench", "memory", str(cfg), "--timed-steps", "0", "--json"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert all(p["step_seconds"] is None for p in r["measured_parts"].values())  # memory only
    assert r["num_blocks"] == 2 and len(r["block_peak_bytes"]) == 2
    assert r["e2e_peak_bytes"] > 0 and all(b > 0 for b in r["block_peak_bytes"])
    # a block holds half the layers: its saved activations are well under the whole model's
    parts = r["measured_parts"]
    assert parts["block0"]["saved_activation_bytes"] < 0.8 * parts["e2e"]["saved_activation_bytes"]
    assert parts["e2e_checkpointed"]["saved_activation_bytes"] < parts["e2e"]["saved_activation_bytes"]
    # checkpointing inside a block keeps only each layer's input: less saved, fewer peak bytes
    for b in range(2):
        kept, full = parts[f"block{b}_checkpointed"], parts[f"block{b}"]
        assert kept["saved_activation_bytes"] < 0.6 * full["saved_activation_bytes"]
        assert kept["params"] == full["params"]
    assert len(r["block_checkpointed_peak_bytes"]) == 2
    assert r["block_params"] == [parts["block0"]["params"], parts["block1"]["params"]]
    assert r["e2e_params"] == parts["e2e"]["params"] > 0
    assert len(r["analytic_bytes"]["blocks"]) == 2
    # the tight allocator follows live tensors: half the layers take clearly less than all of them
    assert r["allocator"] == "tight"
    assert max(r["block_peak_bytes"]) < 0.9 * r["e2e_peak_bytes"]


def test_bench_memory_rejects_an_unknown_allocator(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text(TOML)
    out = CliRunner().invoke(main, ["bench", "memory", str(cfg), "--allocator", "jemalloc"])
    assert out.exit_code != 0 and "jemalloc" in out.output


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("checkpoint_chunks", 0), ("timed_steps", -1)])
def test_measure_all_refuses_a_bad_count_before_any_worker_starts(tmp_path, field, value):
    """0 slices or a batch of 0 is refused, not replaced by the config's value."""
    cfg = tmp_path / "m.toml"
    cfg.write_text(TOML)
    with pytest.raises(ValueError, match=f"{field} must be >= "):
        measure_all(cfg, **{field: value})


def test_checkpoint_chunks_shrink_what_a_checkpointed_block_recomputes(tmp_path):
    """Recomputing each layer over 4 slices of the batch: the same bytes saved, a smaller peak."""
    cfg = tmp_path / "m.toml"
    cfg.write_text(TOML)
    one, four = (_spawn(str(cfg), "block0_checkpointed", 256, "cpu", "tight", c) for c in (1, 4))
    assert four["saved_activation_bytes"] == one["saved_activation_bytes"]
    assert four["step_seconds"] > 0 and one["step_seconds"] > 0
    assert four["peak_bytes"] < 0.8 * one["peak_bytes"], (four["peak_bytes"], one["peak_bytes"])


def test_the_train_process_is_measured_beside_the_model_step(tmp_path):
    from dbcore.runs.process_memory import measure_process

    cfg = tmp_path / "m.toml"
    cfg.write_text(TOML.replace("batch_size = 256", "batch_size = 256\nthreads = 1\ncheckpoint_every = 2"))
    runner = CliRunner()
    assert runner.invoke(main, ["cache", str(cfg), "--out", str(tmp_path / "c.zarr")]).exit_code == 0
    r = measure_process(cfg, tmp_path / "c.zarr", 2, steps=2, allocator="tight")
    assert r["allocator"] == "tight" and r["steps"] == 2 and len(r["block_peak_bytes"]) == 2
    # torch imported and the store opened: a share every process pays, below any training run
    assert 0 < r["fixed_bytes"] < min(r["e2e_peak_bytes"], *r["block_peak_bytes"])
    assert r["max_block_over_e2e"] == max(r["block_peak_bytes"]) / r["e2e_peak_bytes"]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        measure_process(cfg, tmp_path / "c.zarr", 2, steps=0)
    out = runner.invoke(main, ["bench", "memory", str(cfg), "--process-steps", "3"])
    assert out.exit_code == 1 and "--process-steps needs --store" in out.output


def test_the_device_peak_child_runs_a_module_or_code_as_python_would(tmp_path):
    """The CUDA path's child wrapper: argv passed on, exit codes kept, the device's peak written
    (0 here: CUDA never used on this machine's tests)."""
    from dbcore.runs.process_memory import peak_of

    host, device = peak_of(["-m", "dbcore.cli", "--version"], "default", "cuda")
    assert host > 0 and device == 0
    marker = tmp_path / "ran"
    host, device = peak_of(["-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(marker), "ok"],
                           "default", "cuda")
    assert marker.read_text() == "ok" and device == 0
    with pytest.raises(RuntimeError, match="exit 3"):
        peak_of(["-c", "raise SystemExit(3)"], "default", "cuda")
    with pytest.raises(RuntimeError, match="No such command"):
        peak_of(["-m", "dbcore.cli", "no-such-command"], "default", "cuda")
