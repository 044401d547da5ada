import numpy as np
import pytest

from dbcore.data.sources import load_source
from dbcore.errors import SourceError


def test_digits_splits_partition_the_dataset():
    full, train, valid = load_source("digits"), load_source("digits:train"), load_source("digits:valid")
    assert full.images.shape == (1797, 8, 8, 1) and full.images.dtype == np.uint8
    assert len(train.labels) + len(valid.labels) == 1797
    assert np.array_equal(np.concatenate([train.labels, valid.labels]), full.labels)
    assert full.images.max() == 255 and full.num_classes == 10
    assert train.sha256() != valid.sha256() and train.sha256() == load_source("digits:train").sha256()


def test_npz_grey_and_colour(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, images=np.zeros((5, 4, 4), np.uint8), labels=np.arange(5))
    assert load_source(f"npz:{p}").images.shape == (5, 4, 4, 1)
    np.savez(p, images=np.zeros((5, 4, 4, 3), np.uint8), labels=np.arange(5))
    assert load_source(f"npz:{p}").images.shape == (5, 4, 4, 3)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((3, 4, 4), np.float32), "labels": np.arange(3)}, "must be uint8"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.arange(4)}, "3 images but 4 labels"),
        ({"images": np.zeros((3, 4, 4), np.uint8)}, "missing array"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(3, np.float32)}, "must be integer"),
    ],
)
def test_npz_bad_input_names_the_problem(tmp_path, arrays, message):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(SourceError, match=message):
        load_source(f"npz:{p}")


def test_unknown_spec_and_missing_file(tmp_path):
    with pytest.raises(SourceError, match="unknown data source"):
        load_source("cifar")
    with pytest.raises(SourceError, match="not found"):
        load_source(f"npz:{tmp_path / 'nope.npz'}")
