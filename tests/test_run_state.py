"""Run state lives in a `RunState` the pipeline passes along, never on recipe objects.

A `Recipe` object run twice, on different inputs, gives what two fresh recipes give, and is itself
left exactly as it was (no learned scales, selections or data paths written onto its edits).
"""

from __future__ import annotations

import hashlib
import shutil

import pytest

import weightx
from weightx.recipe.model import Recipe
from weightx.testing import default_corpus


def _shards(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _state_of(recipe: Recipe) -> list:
    """Everything a recipe object holds, private attributes of its edits included."""
    edits = [e for d in recipe.deltas for e in d.edits]
    return [recipe.model_dump(), recipe.__pydantic_private__, [(e.model_dump(), e.__pydantic_private__) for e in edits]]


@pytest.mark.slow
@pytest.mark.parametrize("edit", [
    {"ternary": {"density": 0.3, "scope": "global"}},
    {"bitdelta": {"distill": {"data": "CORPUS", "steps": 3, "batch_size": 2, "max_length": 32}}},
], ids=["global-ternary", "bitdelta-distill"])
@pytest.mark.parametrize("fmt", ["delta", "dense"])
def test_a_recipe_object_reused_on_other_inputs_equals_a_fresh_one(family, tmp_path, edit, fmt):
    ft = tmp_path / "ft"
    if "bitdelta" in edit:
        edit = {"bitdelta": {**edit["bitdelta"], "distill": {**edit["bitdelta"]["distill"], "data": str(default_corpus())}}}
    doc = {"models": {"base": str(family["base"]), "ft": str(ft)}, "base": "base",
           "deltas": [{"model": "ft", "edits": [edit]}], "output": {"format": fmt, "config_from": "ft"}}
    recipe = Recipe.model_validate(doc)
    before = _state_of(recipe)

    shutil.copytree(family["sft"], ft)
    weightx.apply(recipe, output=tmp_path / "first", device="cpu")
    shutil.rmtree(ft)
    shutil.copytree(family["dpo"], ft)  # other inputs at the same path
    weightx.apply(recipe, output=tmp_path / "reused", device="cpu")
    weightx.apply(Recipe.model_validate(doc), output=tmp_path / "fresh", device="cpu")

    assert _shards(tmp_path / "reused") == _shards(tmp_path / "fresh")
    assert _shards(tmp_path / "first") != _shards(tmp_path / "fresh")
    assert _state_of(recipe) == before


def test_plans_are_frozen_data(family, tmp_path):
    import dataclasses

    plan = weightx.plan({"models": {"base": str(family["base"]), "ft": str(family["dpo"])}, "base": "base",
                         "deltas": [{"model": "ft", "edits": [{"ternary": {"density": 0.3}}]}],
                         "output": {"path": str(tmp_path / "o"), "format": "delta"}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.shards = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.tensors[0].parts = None  # type: ignore[misc]
    assert isinstance(plan.tensors, tuple) and all(isinstance(t.edits, tuple) for t in plan.tensors)
