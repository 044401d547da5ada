"""Recipes: one module per architecture of the paper (METHOD.md section 7), found by name here.

Orchestration code (train, cache, sampler, evaluate, memory, chain, paper_shared) knows a recipe
only through `dbcore.recipes.base.Recipe` and this registry. Adding an architecture means one
module with a `Recipe` subclass, one line below, a config and its tests.
"""

from __future__ import annotations

import importlib
from typing import Any

REGISTRY: dict[str, str] = {  # recipe name -> "module:class"
    "vit": "dbcore.recipes.vit:ViTRecipe",
    "dit": "dbcore.recipes.dit:DiTRecipe",
    "mdlm": "dbcore.recipes.mdlm:MDLMRecipe",
    "arlm": "dbcore.recipes.arlm:ARRecipe",
    "looped": "dbcore.recipes.looped:LoopedRecipe",
}


def recipe_class(name: str) -> Any:
    """The Recipe subclass registered as `name` (ValueError naming the known ones otherwise)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def config_class(name: str) -> type:
    """The [model] dataclass of recipe `name`."""
    return recipe_class(name).config_class


def for_config(cfg: Any) -> Any:
    """The recipe of a run's `Config`, built from it."""
    return recipe_class(cfg.recipe)(cfg)
