"""The trainer's host-to-device path on a CUDA device (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dbcore.method.batch import INDEX
from dbcore.runs.loop import to_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_batches_reach_the_device_through_pinned_memory_unchanged():
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 65, (32, 64), dtype=np.int32), INDEX: np.arange(32, dtype=np.int64),
             "x": rng.standard_normal((32, 3, 8, 8)).astype(np.float16)[:, :, ::2]}  # a strided view
    out = to_device(batch, ("tokens", "x"), torch.device("cuda"))
    torch.cuda.synchronize()
    for k, a in batch.items():
        assert out[k].device.type == "cuda"
        np.testing.assert_array_equal(out[k].cpu().numpy(), a)
