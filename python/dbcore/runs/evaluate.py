"""`dbcore eval`: a run's report on a data source, by its recipe (`Recipe.evaluate`).

A DiffusionBlocks run is evaluated through the sampler with one block in memory at a time; an
end-to-end run through its own model. The recipe decides what is reported (accuracy for a
classifier, FID and class accuracy for a generator).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dbcore import remote, rundir
from dbcore.config import Config, from_dict
from dbcore.recipes import for_config
from dbcore.recipes.base import Frozen, Recipe


@remote.mirrored("run")
def load_run(run: Path) -> tuple[dict, Config]:
    info = rundir.read_run_json(run)
    return info, from_dict(info["config"], str(Path(run) / "run.json"))


def block_loader(run: Path, kind: str, recipe: Recipe):
    """load_block(b) for the sampler: a block of a "blocks" run, or of the paper-shared model."""
    if kind == "paper-shared":
        from dbcore.paper_shared import load_shared

        shared = load_shared(run, recipe)
        return lambda b: shared.blocks[b]
    frozen: Frozen = rundir.frozen_from_checkpoint(run, rundir.block_name(0), recipe.frozen_arrays,
                                                   recipe=recipe.name)
    return lambda b: rundir.load_trained_block(run, recipe, b, frozen)


def load_e2e(run: Path, recipe: Recipe) -> nn.Module:
    frozen = rundir.frozen_from_checkpoint(run, rundir.E2E, recipe.frozen_arrays, required=False,
                                           recipe=recipe.name)
    return rundir.load_model(run, rundir.E2E, recipe.build_e2e(frozen), recipe=recipe.name)


@remote.mirrored("run")
def evaluate(run: Path, data: str, num_steps: int | None = None, decode: str | None = None,
             **options) -> dict:
    """One JSON-able dict: the recipe's report of the run on `data`, with the run's kind."""
    info, cfg = load_run(run)
    recipe = for_config(cfg)
    opts = {"num_steps": num_steps, "decode": decode, "store": info.get("store"), "data": data, **options}
    report = recipe.evaluate(*_models(run, info["kind"], recipe), data, opts)
    return {"kind": info["kind"], "recipe": cfg.recipe, "data": data, **report}


def _models(run: Path, kind: str, recipe: Recipe) -> tuple:
    """(load_block, None) of a chain of blocks, or (None, the model) of an end-to-end run."""
    if kind == "e2e":
        return None, load_e2e(run, recipe)
    return block_loader(run, kind, recipe), None


@remote.mirrored("run")
def sample_text_run(run: Path, options: dict) -> list[str]:
    """Texts of a language-model run (`Recipe.sample_text`), one block in memory at a time.
    options: num, length, prompt, steps, temperature, top_k, seed (recipe-specific ones too)."""
    info, cfg = load_run(run)
    recipe = for_config(cfg)
    if recipe.source_kind != "text":
        raise rundir.RunError(f"run {run}: recipe {cfg.recipe!r} does not generate text")
    opts = {"seed": cfg.train.seed, **{k: v for k, v in options.items() if v is not None}}
    return recipe.sample_text(*_models(run, info["kind"], recipe), opts)
