import pytest
import torch

from dbcore.runs import checkpoint


def test_roundtrip_and_prefix(tmp_path):
    base = tmp_path / "block0"
    tensors = {"model.w": torch.arange(6.0).reshape(2, 3), "optim.0.exp_avg": torch.ones(3)}
    digest = checkpoint.save(base, tensors, {"step": 7})
    loaded, meta = checkpoint.load(base, prefix="model.")
    assert list(loaded) == ["w"] and torch.equal(loaded["w"], tensors["model.w"])
    assert meta["step"] == 7 and meta["sha256"] == digest
    assert not list(tmp_path.glob("*.tmp"))


def test_tampered_tensor_file_is_refused(tmp_path):
    base = tmp_path / "b"
    checkpoint.save(base, {"w": torch.zeros(4)}, {})
    data = bytearray(base.with_suffix(".safetensors").read_bytes())
    data[-1] ^= 0xFF
    base.with_suffix(".safetensors").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.load(base)


def test_interrupted_write_is_not_a_checkpoint(tmp_path):
    base = tmp_path / "b"
    # what a crash between the two renames leaves: tensors present, no JSON
    checkpoint.save(base, {"w": torch.zeros(4)}, {})
    base.with_suffix(".json").unlink()
    assert not checkpoint.exists(base)
    with pytest.raises(checkpoint.CheckpointError, match="missing or interrupted"):
        checkpoint.load(base)


def test_bad_json_is_a_clear_error(tmp_path):
    base = tmp_path / "b"
    checkpoint.save(base, {"w": torch.zeros(4)}, {})
    base.with_suffix(".json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="not valid JSON"):
        checkpoint.load_meta(base)


def test_weights_of_another_model_are_named_not_loaded(tmp_path):
    """A checkpoint written by another model (renamed or resized weights), at evaluation or on
    resuming: an error that names the weights, and the model is left as it was."""
    from dbcore.runs.loop import _resume, _save

    old = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    _save(tmp_path / "block0", old, torch.optim.AdamW(old.parameters()), {"step": 3, "stream": {}})
    new = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2), torch.nn.Linear(2, 2))
    before = {k: v.clone() for k, v in new.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match=r"resuming.*missing 2\.bias, 2\.weight; "
                       r"found vs expected shape 0\.bias \(8,\) vs \(6,\), 0\.weight"):
        _resume(tmp_path / "block0", new, torch.optim.AdamW(new.parameters()), None, None)
    tensors, _ = checkpoint.load(tmp_path / "block0", prefix="model.")
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected 1\.bias, 1\.weight$"):
        checkpoint.load_into(torch.nn.Sequential(torch.nn.Linear(4, 8)), tensors, "here")
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    checkpoint.load_into(old, tensors, "here")  # the model that wrote it loads it
