"""`dbcore eval`: a run's report on a data source, by its recipe (`Recipe.evaluate`).

A DiffusionBlocks run is evaluated through the sampler with one block in memory at a time; an
end-to-end run through its own model. The recipe decides what is reported (accuracy for a
classifier, FID and class accuracy for a generator).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from dbcore.config import Config, from_dict
from dbcore.data.sources import image_format, load_source
from dbcore.data.text import load_text
from dbcore.method import layout
from dbcore.method.batch import Frozen
from dbcore.method.options import Options
from dbcore.models.lm import tokenizer_of
from dbcore.recipes import for_config
from dbcore.recipes.base import Recipe
from dbcore.runs import mirror, rundir
from dbcore.runs.reference import fid_reference


@mirror.mirrored("run")
def load_run(run: Path) -> tuple[dict, Config]:
    info = rundir.read_run_json(run)
    return info, from_dict(info["config"], str(Path(run) / "run.json"))


def block_loader(run: Path, kind: str, recipe: Recipe):
    """load_block(b) for the sampler: a block of a "blocks" run, or of the paper-shared model."""
    if kind == "paper-shared":
        from dbcore.runs.paper_shared import load_shared

        shared = load_shared(run, recipe)
        return lambda b: shared.blocks[b]
    frozen: Frozen = rundir.frozen_from_checkpoint(run, rundir.block_name(0), recipe.frozen_arrays,
                                                   recipe=recipe.name)
    return lambda b: rundir.load_trained_block(run, recipe, b, frozen)


def load_e2e(run: Path, recipe: Recipe) -> nn.Module:
    frozen = rundir.frozen_from_checkpoint(run, rundir.E2E, recipe.frozen_arrays, required=False,
                                           recipe=recipe.name)
    return rundir.load_model(run, rundir.E2E, recipe.build_e2e(frozen), recipe=recipe.name)


@mirror.mirrored("run")
def evaluate(run: Path, data: str, num_steps: int | None = None, decode: str | None = None,
             reference_valid: str | None = None, **options) -> dict:
    """One JSON-able dict: the recipe's report of the run on source `data`, with the run's kind.
    `options`: the fields of `Options` (steps in all are `num_steps`); `reference_valid`: the
    held-out source a generator's FID reference network is checked on (default: `data`)."""
    info, cfg = load_run(run)
    recipe = for_config(cfg)
    opts = Options.of({"steps": num_steps, "decode": decode, **options})
    if recipe.fid_reference:
        if not info.get("store"):
            raise ValueError("DiT evaluation needs the run's training store (run.json 'store')")
        opts = dataclasses.replace(opts, reference=fid_reference(info["store"], reference_valid or data))
    source = _source(run, info["kind"], recipe, data)
    report = recipe.evaluate(*_models(run, info["kind"], recipe), source, opts)
    return {"kind": info["kind"], "recipe": cfg.recipe, "data": data, **report}


def _source(run: Path, kind: str, recipe: Recipe, data: str) -> Any:
    """Source `data` as the recipe reads it: labelled images, or a text through the run's tokenizer."""
    if recipe.source_kind != "text":
        return load_source(data, image=image_format(recipe.model_cfg))
    name = rundir.E2E if kind == "e2e" else rundir.SHARED if kind == "paper-shared" else rundir.block_name(0)
    frozen = rundir.frozen_from_checkpoint(run, name, (layout.TOKENIZER,), recipe=recipe.name)
    return load_text(data, tokenizer_of(frozen))


def _models(run: Path, kind: str, recipe: Recipe) -> tuple:
    """(load_block, None) of a chain of blocks, or (None, the model) of an end-to-end run."""
    if kind == "e2e":
        return None, load_e2e(run, recipe)
    return block_loader(run, kind, recipe), None


@mirror.mirrored("run")
def sample_text_run(run: Path, options: dict) -> list[str]:
    """Texts of a language-model run (`Recipe.sample_text`), one block in memory at a time.
    options: num, length, prompt, steps, temperature, top_k, seed (recipe-specific ones too)."""
    info, cfg = load_run(run)
    recipe = for_config(cfg)
    if recipe.source_kind != "text":
        raise rundir.RunError(f"run {run}: recipe {cfg.recipe!r} does not generate text")
    opts = Options.of({"seed": cfg.train.seed, **{k: v for k, v in options.items() if v is not None}})
    return recipe.sample_text(*_models(run, info["kind"], recipe), opts)
