"""The recipe interface: everything the orchestration modules know about an architecture.

A recipe (one module under `recipes/`, registered in `recipes/__init__.py`) says what the cache
holds for it, what a batch streams, which noise a sample needs, how block b and the end-to-end
baseline are built, the one per-batch loss of each, how a sampler step reads out, and what
evaluation reports. Training, caching, sampling, memory measurement and the paper-shared layout go
through these methods only.

Conventions: a `Batch` is a dict of tensors on the training device holding the streamed arrays
(`stream_arrays`) and `"index"` (sample indices, int64). Every block module exposes `layers`
(its transformer layers; everything else in it is embedding, conditioning or readout).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dbcore.method.batch import Batch, Frozen, Noised, NoiseRequest
from dbcore.method.edm import SIGMA_MAX, SIGMA_MIN
from dbcore.method.loss import sample_weights
from dbcore.method.noise import block_noise
from dbcore.method.options import Options
from dbcore.method.partition import block_sigma_law


@dataclass(frozen=True)
class FrozenModule:
    """Modules of a finished run that a recipe trains beside, frozen: their outputs are cached once
    in a sub-store of the training store as array `output`, streamed instead of recomputed."""

    run: str  # the finished run (its baseline's checkpoint, or block 0's)
    prefixes: tuple[str, ...]  # the frozen modules' parameter names begin with one of these
    output: str  # the array of their outputs in the sub-store
    option: str  # the config key that names the run (for messages)


class Recipe(ABC):
    """One architecture of METHOD.md section 7, built from a run's `Config` (model and train)."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    stream_arrays: ClassVar[tuple[str, ...]]  # what a training batch streams from the store
    cond_arrays: ClassVar[tuple[str, ...]]  # what the sampler conditions on (a subset of them)
    frozen_arrays: ClassVar[tuple[str, ...]] = ()  # store arrays every model of the run loads
    cache_fields: ClassVar[tuple[str, ...]]  # [model] keys the cached arrays depend on
    generates: ClassVar[bool] = False  # True: `sample` and `to_images` make the product (images)
    source_kind: ClassVar[str] = "images"  # what `dbcore cache --data` reads: images or text
    cached_noise: ClassVar[bool] = True  # False: noise is drawn online only (`--noise cached` refused)
    chain_training: ClassVar[bool] = True  # False: `[train] mode = "sequential"` refused
    fid_reference: ClassVar[bool] = False  # True: `evaluate` needs `options.reference`
    augmented: ClassVar[str | None] = None  # the streamed images `[train] augment_*` transforms
    augment_changes_targets: ClassVar[bool] = False  # True: augmented images are the targets

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg  # dbcore.config.Config
        self.model_cfg = cfg.model

    # ------------------------------------------------------------------ cache

    @abstractmethod
    def cache_arrays(self, source: Any, seed: int, target_embedding: np.ndarray | None
                     ) -> tuple[dict[str, np.ndarray], dict]:
        """Checked source -> the arrays to cache (name -> rows) and attributes describing them."""

    def stream_windows(self) -> tuple[int, int] | None:
        """(seq_len, stride) when a sample is a window cut at read time from the flat streamed
        arrays (`BatchStream(windows=)`): a text recipe's; None when a sample is a row."""
        if self.source_kind != "text":
            return None
        m = self.model_cfg
        return m.seq_len, m.stride or m.seq_len

    # ------------------------------------------------------------------ noise

    @abstractmethod
    def noise_request(self, target_shape: tuple[int, ...]) -> NoiseRequest:
        """Draws per sample, given the store's per-sample target shape."""

    def sigma_law(self, block: int) -> tuple[float, float, str]:
        """(lo, hi, in-block distribution) of block `block` (`dbcore.method.partition.block_sigma_law`)."""
        m = self.model_cfg
        return block_sigma_law(m.sigma_dist, block, m.num_blocks, m.gamma)

    def e2e_law(self) -> tuple[float, float, str]:
        """The noise law of a denoising baseline: the whole range."""
        return (SIGMA_MIN, SIGMA_MAX, "lognormal")

    def noise(self, batch: dict[str, np.ndarray], y: torch.Tensor, block: int, draw: int,
              law: tuple[float, float, str], seed: int, backend: str = "torch") -> Noised:
        """The noise of a streamed batch (numpy arrays as the stream ships them) with clean
        targets y: z = y + sigma * eps (`dbcore.method.noise.block_noise`) unless the recipe corrupts its
        targets otherwise (masking). `block` is the generator's block id, `law` the level's law."""
        return block_noise(batch, y, block, draw, law, seed, backend)

    def loss_weights(self, noised: Noised) -> torch.Tensor:
        """Per-sample loss weights (N,): the run's `[train] weight` of sigma (METHOD.md 2)."""
        t = self.cfg.train
        return sample_weights(noised.sigma, t.weight, t.weight_clamp)

    @abstractmethod
    def targets(self, batch: Batch, frozen: Frozen) -> torch.Tensor:
        """Clean targets y (N, ...) of a batch: what the cache and the stream noise."""

    def train_targets(self, y: torch.Tensor, batch: Batch, frozen: Frozen, block: int, draw: int
                      ) -> torch.Tensor:
        """The targets block `block` learns at draw (epoch) `draw`; y unless the recipe reshapes
        them in training (the trainer then moves z by the same amount, keeping sigma * eps)."""
        return y

    @abstractmethod
    def target_shape(self, frozen: Frozen) -> tuple[int, ...]:
        """Per-sample shape of y."""

    # ------------------------------------------------------------------ models and losses

    @abstractmethod
    def build_block(self, block: int, frozen: Frozen) -> nn.Module:
        """Block `block` alone, owning every trainable parameter it uses."""

    @abstractmethod
    def build_e2e(self, frozen: Frozen) -> nn.Module:
        """The end-to-end baseline of the same depth and width; its transformer layers are
        `layers` (activation checkpointing: `dbcore.models.layers.checkpoint_layers`)."""

    @abstractmethod
    def block_loss(self, block: nn.Module, batch: Batch, noised: Noised, w: torch.Tensor,
                   backend: str = "torch") -> torch.Tensor:
        """mean_i w_i * loss_i of one batch: the only block loss of the recipe."""

    @abstractmethod
    def e2e_loss(self, model: nn.Module, batch: Batch, noised: Noised | None, w: torch.Tensor | None,
                 backend: str = "torch") -> torch.Tensor:
        """The baseline's loss of one batch (`noised` and weights `w` are drawn over the whole
        noise range when `e2e_noise` is True, else None)."""

    e2e_noise: ClassVar[bool] = False  # True: the baseline draws noise over all sigma (or uniforms)

    def frozen_module(self) -> FrozenModule | None:
        """Modules of another finished run that training keeps frozen, streaming their cached
        outputs instead of running them (`dbcore.runs.frozen_module`); None: the recipe has none."""
        return None

    def freeze(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the frozen modules' weights (names as in the model): every model built afterwards
        holds them and does not train them."""
        raise NotImplementedError(f"recipe {self.name!r} freezes no module")

    def frozen_outputs(self, model: nn.Module, rows: Batch) -> torch.Tensor:
        """The frozen modules' outputs (N, ...) of `model` for rows of the streamed arrays, no grad."""
        raise NotImplementedError(f"recipe {self.name!r} freezes no module")

    def step_passes(self, kind: str, noised: Noised | None) -> dict[str, tuple[int, int]] | None:
        """(forward, backward) passes of each module in one training step of `kind` ("block" or
        "e2e"), for the run's compute ledger (`dbcore.method.flops.Ledger`); None: the recipe keeps none."""
        return None

    def pass_flops(self, batch_size: int, frozen: Frozen) -> dict[str, float]:
        """Forward FLOPs of one pass of each module that `step_passes` names, over a training batch;
        empty: the recipe keeps no compute ledger."""
        return {}

    def example_batch(self, batch_size: int, frozen: Frozen, device: torch.device) -> Batch:
        """A random batch of the streamed arrays (memory benchmarks)."""
        raise NotImplementedError

    def example_frozen(self, seed: int = 0) -> Frozen:
        """Frozen arrays as a fresh cache would write them (memory benchmarks)."""
        return {}

    # ------------------------------------------------------------------ sampling

    @abstractmethod
    def denoise_step(self, block: nn.Module, cond: Batch, z: torch.Tensor, sigma: torch.Tensor,
                     options: Options) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(D_hat in target space (N, ...), a readout such as logits or None) at level sigma (N,)."""

    def sample(self, load_block: Any, e2e: nn.Module | None, labels: torch.Tensor, options: Options
               ) -> torch.Tensor:
        """A generating recipe's samples in target space for conditions `labels` (`dbcore sample`)."""
        raise NotImplementedError(f"recipe {self.name!r} does not generate samples")

    def to_images(self, x: torch.Tensor) -> np.ndarray:
        """A generating recipe's samples as uint8 (N, H, W, C)."""
        raise NotImplementedError(f"recipe {self.name!r} does not generate images")

    @abstractmethod
    def evaluate(self, load_block: Any, e2e: nn.Module | None, source: Any, options: Options) -> dict:
        """The JSON-able report of `dbcore eval` on a loaded source (labelled images, or a text
        read through the run's vocabulary): of the chain of blocks that `load_block(b)` returns
        (one at a time, `dbcore.method.sampler.run_chain`), or of the end-to-end model `e2e`."""


def decayed_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weight matrices of Linear and Conv layers, everything else): only the first are decayed;
    norms, biases, embeddings, position tables and adaLN gates are not (nanoGPT's rule)."""
    decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            decay_ids.add(id(module.weight))
    decay, rest, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if id(p) in decay_ids else rest).append(p)
    return decay, rest
