import pytest
import torch

from dbcore import checkpoint


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
