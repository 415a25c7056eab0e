"""The recipe layer: the recipe YAML (docs/recipe.md) as typed models, its sweep and gate grammar."""

from weightx.recipe.model import DeltaSpec, OutputSpec, PushSpec, Recipe, ValidateSpec, load_recipe, parse_size

__all__ = ["Recipe", "DeltaSpec", "OutputSpec", "PushSpec", "ValidateSpec", "load_recipe", "parse_size"]
