"""What `eval` and `sample` may ask of a recipe, typed: each field None (or its default) leaves the
choice to the run's config. One class for both, since the sampler's settings are shared."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from torch import nn


@dataclass(frozen=True)
class FidReference:
    """The reference classifier a generator's FID is measured in, and the real training images
    its floor is drawn from (`dbcore.runs.reference`)."""

    net: nn.Module
    meta: dict
    train_images: np.ndarray  # uint8 (N, H, W, C)


@dataclass(frozen=True)
class Options:
    """Evaluation and sampling options of a run."""

    steps: int | None = None  # sampler steps in all (a looped LM: iterations)
    decode: str | None = None  # classifier and AR LM: "last" or "product"
    sampler: str | None = None  # "euler", "heun" (DiT) or "ancestral" (AR and looped LMs)
    cfg_scale: float | None = None  # generator: guidance scale
    seed: int | None = None  # sampling seed
    num_samples: int | None = None  # eval: a generator's samples for FID, or LM windows (None: all)
    eval_chains: int | None = None  # eval of AR (Euler) and looped LMs: initial states per position
    eval_draws: int | None = None  # eval of AR and looped LMs: draws per position
    exact: bool = False  # eval of AR and looped LMs, ancestral: sum every level's tokens exactly
    eval_head: int | None = None  # eval of AR and looped LMs, ancestral: likeliest tokens per level
    eval_tail: int | None = None  # eval of AR and looped LMs, ancestral: tokens drawn per level
    num: int = 1  # sample: texts to write
    length: int | None = None  # sample: tokens per text, prompt included
    prompt: str | None = None  # sample: the beginning of every text
    temperature: float | None = None  # sample: softmax temperature (None: 1)
    top_k: int | None = None  # sample among the k likeliest tokens
    greedy: bool = False  # sample: the likeliest token every time
    reference: FidReference | None = None  # eval of a generator: handed in by the evaluation stage

    @classmethod
    def of(cls, values: dict[str, Any], where: str = "options") -> Options:
        """Options from keyword values (None values skipped); an unknown name is a ValueError
        naming it and the known ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; expected some of {sorted(names)}")
        return cls(**{k: v for k, v in values.items() if v is not None})
