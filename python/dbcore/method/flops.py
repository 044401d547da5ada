"""Training compute: FLOPs of the layers, and a ledger of the passes each module made.

Counts are of multiply-adds times two (one FLOP each) in the matrix products; norms, activations
and softmax are left out. A backward pass costs BACKWARD_FACTOR forward passes (gradients of the
inputs and of the weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKWARD_FACTOR = 2.0


def linear_flops(rows: int, fan_in: int, fan_out: int) -> float:
    """Forward FLOPs of a dense layer over `rows` rows."""
    return 2.0 * rows * fan_in * fan_out


def layer_flops(rows: int, dim: int, mlp_ratio: float, keys: int) -> float:
    """Forward FLOPs of one transformer layer over `rows` rows, each attending to `keys` keys
    (as computed: a masked dense attention computes every key): qkv, output projection, the two
    MLP matrices, scores and their weighted sum."""
    hidden = int(dim * mlp_ratio)
    attention = linear_flops(rows, dim, 3 * dim) + linear_flops(rows, dim, dim)
    dense = attention + 2 * linear_flops(rows, dim, hidden)
    return dense + score_flops(rows, keys, dim)


def score_flops(rows: int, keys: int, dim: int) -> float:
    """Forward FLOPs of attention's scores q k^T and their weighted sum of values, `rows` rows
    against `keys` keys of width `dim` (all heads together)."""
    return 2 * 2.0 * rows * keys * dim


@dataclass
class Ledger:
    """A model's training compute so far: forward and backward passes per module, and FLOPs."""

    passes: dict[str, list[int]] = field(default_factory=dict)  # module -> [forward, backward]
    flops: float = 0.0

    def add(self, passes: dict[str, tuple[int, int]], forward_flops: dict[str, float]) -> None:
        """One step's passes, with each module's forward FLOPs per pass."""
        for name, (fwd, bwd) in passes.items():
            total = self.passes.setdefault(name, [0, 0])
            total[0] += fwd
            total[1] += bwd
            self.flops += (fwd + BACKWARD_FACTOR * bwd) * forward_flops[name]

    def to_json(self) -> dict:
        return {"passes": {k: list(v) for k, v in self.passes.items()}, "flops": self.flops}

    @classmethod
    def from_json(cls, d: dict) -> Ledger:
        return cls({k: [int(v[0]), int(v[1])] for k, v in d["passes"].items()}, float(d["flops"]))
