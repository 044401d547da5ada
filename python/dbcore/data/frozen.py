"""The frozen arrays of a store that a recipe's models need (a target embedding, a tokenizer),
read once by the stage that opened the store and handed to the recipe as tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dbcore.method.batch import Frozen


def read_frozen(s: Any, names: Sequence[str]) -> Frozen:
    """Arrays `names` of store `s` as tensors: floats as float32, bytes (uint8) as they are, other
    integers as int64."""
    out = {}
    for name in names:
        t = torch.from_numpy(s.read(name))
        out[name] = t.float() if t.is_floating_point() else t if t.dtype == torch.uint8 else t.long()
    return out
