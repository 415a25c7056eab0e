"""Sweeps: list-valued parameters, evaluated in memory, only the winner written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from weightx.cli import main
from weightx.errors import RecipeError
from weightx.recipe.model import load_recipe
from weightx.testing import REPO_ROOT

TINY = REPO_ROOT / "examples" / "tiny"
ALPHAS = [0.1, 0.5, 2.0]
VALIDATE = {"tasks": ["weightx_mc", "weightx_ppl"], "limit": 6, "batch_size": 4}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def recipe_data(out: Path, alpha, **validate) -> dict:
    return {
        "name": "tiny-expo-sweep",
        "models": {"sft": str(TINY / "sft"), "dpo": str(TINY / "dpo")},
        "base": "sft",
        "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": alpha}}]}],
        "output": {"path": str(out), "dtype": "bfloat16", "config_from": "dpo"},
        "validate": {**VALIDATE, **validate},
    }


# ----------------------------------------------------------------------------------- the recipe


def test_list_parameters_make_a_sweep():
    r = load_recipe(recipe_data(Path("out"), ALPHAS, select="weightx_mc/acc"))
    assert [p.label for p in r.sweep.params] == ["deltas.0.edits.0.expo.alpha"]
    assert r.deltas[0].edits[0].alpha == 0.1  # the fields hold the first candidate
    cands = r.sweep.candidates()
    assert [c.deltas[0].edits[0].alpha for _, c in cands] == ALPHAS
    assert all(c.sweep is None for _, c in cands)
    # recipe_form keeps the lists, so a Recipe object round-trips (with --set overrides) as a sweep.
    assert r.recipe_form()["deltas"][0]["edits"][0] == {"expo": {"alpha": ALPHAS}}
    again = load_recipe(r, ["validate.limit=3"])
    assert again.sweep is not None and again.validate_.limit == 3


def test_weight_and_combined_lists_make_a_grid():
    data = recipe_data(Path("out"), [0.1, 0.2], select="weightx_mc/acc")
    data["deltas"][0]["weight"] = [0.5, 1.0, 1.5]
    r = load_recipe(data)
    assert [p.label for p in r.sweep.params] == ["deltas.0.weight", "deltas.0.edits.0.expo.alpha"]
    grid = [(c.deltas[0].weight, c.deltas[0].edits[0].alpha) for _, c in r.sweep.candidates()]
    assert grid == [(w, a) for w in (0.5, 1.0, 1.5) for a in (0.1, 0.2)]


def test_set_override_can_start_a_sweep_and_end_one():
    data = recipe_data(Path("out"), 0.3, select="weightx_mc/acc")
    assert load_recipe(data).sweep is None
    assert load_recipe(data, ["deltas.0.edits.0.expo.alpha=[0.2, 0.4]"]).sweep is not None
    swept = recipe_data(Path("out"), ALPHAS, select="weightx_mc/acc")
    assert load_recipe(swept, ["deltas.0.edits.0.expo.alpha=0.5"]).sweep is None


def test_sweep_errors_come_all_at_once_with_locations():
    data = recipe_data(Path("out"), [0.1, "lots", 0.5])
    data["deltas"][0]["weight"] = [1.0, "x"]
    data["output"]["dtype"] = "int8"
    with pytest.raises(RecipeError) as e:
        load_recipe(data)
    locs = [loc for loc, _ in e.value.problems]
    assert "deltas.0.edits.0.expo.alpha.1" in locs and "deltas.0.weight.1" in locs
    assert "output.dtype" in locs and "validate.select" in locs
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_data(Path("out"), list(range(100)), select="weightx_mc/acc"))
    assert "at most 64" in str(e.value)


# ----------------------------------------------------------------------------------- the weights


def test_in_memory_weights_equal_the_written_checkpoint_bit_for_bit(tmp_path):
    from transformers import AutoModelForCausalLM

    from weightx.api import execute
    from weightx.pipeline.planner import build_plan
    from weightx.validate.sweep import set_weights

    model = AutoModelForCausalLM.from_pretrained(TINY / "dpo", dtype=torch.float32)
    for alpha in (0.5, 2.0):  # twice on the same model object: the second fully replaces the first
        plan = build_plan(load_recipe(recipe_data(tmp_path / f"out{alpha}", alpha)), None, None)
        set_weights(model, plan, torch.device("cpu"))
        execute(plan, device="cpu")
        written = AutoModelForCausalLM.from_pretrained(tmp_path / f"out{alpha}", dtype=torch.float32).state_dict()
        mine = model.state_dict()
        assert mine.keys() == written.keys()
        for name, tensor in written.items():
            assert torch.equal(mine[name], tensor), name


# ----------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path_factory.mktemp("sweep")
    recipe = folder / "sweep.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data(folder / "out", ALPHAS, select="weightx_ppl/bits_per_byte")))
    from weightx.io.safetensors import ShardWriter

    written: list[Path] = []
    original = ShardWriter.__init__

    def spy(self, path, *a, **k):
        written.append(Path(path))
        original(self, path, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(ShardWriter, "__init__", spy)
    try:
        result = CliRunner().invoke(main, ["apply", str(recipe)], catch_exceptions=False)
    finally:
        mp.undo()
    return folder, result, written


@pytest.mark.slow
def test_sweep_evaluates_each_candidate_in_memory_and_writes_only_the_winner(swept):
    folder, result, written = swept
    assert result.exit_code == 0, result.output
    doc = json.loads((folder / "out" / "weightx.json").read_text())
    sw = doc["sweep"]
    assert [c["values"]["deltas.0.edits.0.expo.alpha"] for c in sw["candidates"]] == ALPHAS
    assert sw["direction"] == "min"  # lm-eval: lower bits_per_byte is better
    scores = [c["score"] for c in sw["candidates"]]
    # Candidates are measured on the select task only.
    assert all(set(c["results"]) == {"weightx_ppl"} for c in sw["candidates"])
    assert all(c["results"]["weightx_ppl"]["bits_per_byte"]["value"] == s for c, s in zip(sw["candidates"], scores))
    assert sw["winner"] == scores.index(min(scores))
    winner_alpha = ALPHAS[sw["winner"]]
    assert doc["recipe"]["deltas"][0]["edits"][0]["expo"]["alpha"] == winner_alpha
    # One checkpoint written, nothing else left behind.
    parents = {p.parent for p in written}
    assert len(parents) == 1 and parents.pop().name.startswith(".out.weightx-tmp-")  # apply's temp sibling of out
    assert sorted(p.name for p in folder.iterdir()) == ["out", "sweep.yaml"]
    assert len(list(folder.rglob("*.safetensors"))) == len(list((folder / "out").glob("*.safetensors")))
    # The written output then gets the whole validate block, from disk: on the select task it
    # measures exactly what the winner measured in memory.
    v = doc["validation"]
    assert v["output_from_sweep"] is False and set(v["results"]["output"]) == {"weightx_mc", "weightx_ppl"}
    assert v["results"]["output"]["weightx_ppl"] == sw["candidates"][sw["winner"]]["results"]["weightx_ppl"]
    assert "← winner" in result.output and "## Sweep" in (folder / "out" / "README.md").read_text()


@pytest.mark.slow
def test_winner_matches_a_separate_run_of_that_value_on_disk(swept, tmp_path):
    folder, result, _ = swept
    sw = json.loads((folder / "out" / "weightx.json").read_text())["sweep"]
    alpha = ALPHAS[sw["winner"]]
    recipe = tmp_path / "single.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data(tmp_path / "single", alpha)))
    single = CliRunner().invoke(main, ["apply", str(recipe)], catch_exceptions=False)
    assert single.exit_code == 0, single.output
    doc = json.loads((tmp_path / "single" / "weightx.json").read_text())
    assert doc["validation"]["output_from_sweep"] is False  # evaluated from the folder on disk
    assert doc["validation"]["results"]["output"]["weightx_ppl"] == sw["candidates"][sw["winner"]]["results"]["weightx_ppl"]
    swept_output = json.loads((folder / "out" / "weightx.json").read_text())["validation"]["results"]["output"]
    assert doc["validation"]["results"]["output"] == swept_output
    # And the two outputs hold the same bytes.
    for shard in (tmp_path / "single").glob("*.safetensors"):
        assert shard.read_bytes() == (folder / "out" / shard.name).read_bytes()


@pytest.mark.slow
def test_when_select_covers_every_task_the_winner_is_not_evaluated_again(tmp_path):
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data(tmp_path / "out", [0.5, 2.0], tasks=["weightx_ppl"],
                                                 select="min weightx_ppl/word_perplexity")))
    result = CliRunner().invoke(main, ["apply", str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "weightx.json").read_text())
    assert doc["validation"]["output_from_sweep"] is True
    assert doc["validation"]["results"]["output"] == doc["sweep"]["candidates"][doc["sweep"]["winner"]]["results"]
    assert "measured on the sweep's winning candidate in memory" in result.output


def test_sweep_with_no_validate_is_a_usage_error(tmp_path):
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data(tmp_path / "out", ALPHAS, select="weightx_mc/acc")))
    result = CliRunner().invoke(main, ["apply", str(recipe), "--no-validate"])
    assert result.exit_code == 2
    assert "drop --no-validate" in result.output and not (tmp_path / "out").exists()
    dry = CliRunner().invoke(main, ["apply", str(recipe), "--dry-run"])
    assert dry.exit_code == 0 and "sweep: 3 candidate(s)" in dry.output
