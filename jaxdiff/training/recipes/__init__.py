"""Recipes: `build(config, data_spec) -> Task`, one module per kind of model, by `config.recipe`."""
from __future__ import annotations

import importlib

from jaxdiff.training.config import RECIPES, choice


def build(config, spec):
    name = choice(config.recipe, RECIPES, "recipe")
    return importlib.import_module(f"jaxdiff.training.recipes.{name}").build(config, spec)
