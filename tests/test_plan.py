"""Planning from headers: problems collected together, vocab mismatches named, `weightx plan` output."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from weightx.errors import InputNotFoundError, PlanError, UsageError, WeightxError
from weightx.pipeline.planner import build_plan
from weightx.recipe.model import load_recipe
from conftest import expo_recipe, run_cli, write_recipe


def _save(path, tensors):
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_problems_reported_together(tmp_path):
    a = _save(tmp_path / "a.safetensors", {"model.embed_tokens.weight": torch.zeros(10, 4), "x": torch.zeros(3), "y": torch.zeros(2, 2)})
    b = _save(tmp_path / "b.safetensors", {"model.embed_tokens.weight": torch.zeros(12, 4), "x": torch.zeros(3), "y": torch.zeros(2, 3), "z": torch.zeros(1)})
    with pytest.raises(PlanError) as e:
        build_plan(load_recipe(expo_recipe(a, b, tmp_path / "out")))
    text = str(e.value)
    assert "3 problems" in text
    assert "vocab-size mismatch" in text and "12 rows in 'dpo'" not in text  # base has 10, config_from 12
    assert "'model.embed_tokens.weight' has 10 rows in 'sft' but 12 in 'dpo'" in text
    assert "shape mismatch for 'y'" in text
    assert "tensor 'z' is missing from 'sft'" in text


def test_output_inside_input_refused(family, tmp_path):
    for out in (family["dpo"], family["dpo"] / "sub"):
        with pytest.raises(PlanError, match="output.path .* input 'dpo'"):
            build_plan(load_recipe(expo_recipe(family["sft"], family["dpo"], out)))


def test_no_output_path():
    doc = expo_recipe("a", "b", "x")
    del doc["output"]
    with pytest.raises(UsageError, match="output.path is not set"):
        build_plan(load_recipe(doc))


def test_missing_local_model_named(tmp_path, family):
    with pytest.raises(InputNotFoundError) as e:
        build_plan(load_recipe(expo_recipe(tmp_path / "nope1", tmp_path / "nope2", tmp_path / "out")))
    assert "models.sft" in str(e.value) and "models.dpo" in str(e.value)


@pytest.mark.parametrize("missing", [1, 2])
def test_missing_models_raise_one_type_however_many(tmp_path, family, missing):
    """The standard exception a library user catches, and the same type for one or two missing."""
    sft = tmp_path / "nope1"
    dpo = tmp_path / "nope2" if missing == 2 else family["dpo"]
    with pytest.raises(FileNotFoundError) as e:
        build_plan(load_recipe(expo_recipe(sft, dpo, tmp_path / "out")))
    assert type(e.value) is InputNotFoundError and isinstance(e.value, WeightxError)
    assert len(e.value.problems) == missing


def test_every_user_error_is_also_a_standard_exception():
    import weightx.errors as errors

    standard = (ValueError, OSError, ConnectionError, AssertionError, RuntimeError)
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.WeightxError) and cls is not errors.WeightxError:
            assert issubclass(cls, standard), cls
    assert issubclass(errors.RecipeError, ValueError) and issubclass(errors.OutputBusyError, BlockingIOError)
    assert issubclass(errors.InputNotFoundError, FileNotFoundError) and issubclass(errors.PlanError, ValueError)


@pytest.mark.slow
def test_plan_cli_prints_counts_sizes_shards(family, tmp_path):
    doc = expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3, shard_size="100KB")
    doc["deltas"][0]["edits"].append({"scale": {"factor": 2.0, "include": ["*norm*"]}})
    r = run_cli("plan", str(write_recipe(tmp_path / "r.yaml", doc)))
    assert r.returncode == 0, r.stderr
    n = 21
    assert f"ExPO extrapolation α=0.3 on {n} tensors" in r.stdout
    assert "scale ×2 on 5 tensors" in r.stdout
    assert "shard(s)" in r.stdout and "KB" in r.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_writes_nothing(family, tmp_path):
    r = run_cli("apply", str(write_recipe(tmp_path / "r.yaml", expo_recipe(family["sft"], family["dpo"], tmp_path / "out"))), "--dry-run")
    assert r.returncode == 0 and "plan for" in r.stdout
    assert not (tmp_path / "out").exists()
