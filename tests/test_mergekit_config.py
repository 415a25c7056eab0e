"""mergekit configs read as native recipes (no mergekit needed: the agreement with mergekit itself is
in test_mergekit_agreement.py)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from weightx.errors import RecipeError
from weightx.recipe.mergekit import from_mergekit
from weightx.recipe.model import load_recipe
from weightx.testing import load_state_dict
from conftest import run_cli


def _write(tmp_path, config) -> str:
    p = tmp_path / "merge.yml"
    p.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(p)


def test_ties_config_becomes_magnitude_edits_and_ties(merge_family):
    f = {k: str(v) for k, v in merge_family.items()}
    native, notes = from_mergekit({
        "merge_method": "ties", "base_model": f["base"], "dtype": "bfloat16",
        "models": [{"model": f["base"]}, {"model": f["math"], "parameters": {"weight": 0.5, "density": [0.2, 0.6]}},
                   {"model": f["code"], "parameters": {"weight": 1.0, "density": 0.4}}],
        "parameters": {"lambda": 1.5, "int8_mask": True},
    })
    assert native["base"] == "base" and [d["model"] for d in native["deltas"]] == ["math", "code"]
    assert native["deltas"][0]["edits"] == [{"magnitude": {"density": {"gradient": [0.2, 0.6]}}}]
    assert native["combine"] == {"ties": {"density": 1.0, "normalize": True, "scale": 1.5}}
    assert native["output"] == {"dtype": "bfloat16", "config_from": "base"}
    assert any("int8_mask" in n for n in notes) and any("float32" in n for n in notes)


def test_dare_ties_is_dare_with_l1_rescale_then_ties_sum(merge_family):
    f = {k: str(v) for k, v in merge_family.items()}
    native, _ = from_mergekit({"merge_method": "dare_ties", "base_model": f["base"],
                               "models": [{"model": f["math"], "parameters": {"weight": 1.0, "density": 0.25}}]})
    assert native["deltas"][0]["edits"] == [{"dare": {"drop": 0.75, "rescale": "l1"}}]
    assert native["combine"]["ties"]["normalize"] is False  # mergekit's dare_ties default


@pytest.mark.parametrize("config,message", [
    ({"merge_method": "passthrough", "slices": []}, "stack"),
    ({"merge_method": "passthrough", "models": [{"model": "a"}]}, "not a delta merge"),
    ({"merge_method": "karcher", "models": [{"model": "a"}]}, "not a method weightx runs"),
    ({"merge_method": "ties", "models": [{"model": "a"}, {"model": "b"}]}, "set base_model"),
    ({"merge_method": "linear", "models": [{"model": "a+lora"}, {"model": "b"}]}, "LoRA"),
    ({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "frobnicate": 1}, "unknown mergekit key"),
    ({"merge_method": [1, 2], "models": [{"model": "a"}]}, "expected a method name"),
    ({"merge_method": "ties", "base_model": "b", "parameters": 3, "models": [{"model": "a"}]}, "parameters is a mapping"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"parameters": {}}, {"model": 5}]}, r"models\.0.*\n.*models\.1"),
])
def test_what_weightx_cannot_run_is_one_line_each(config, message):
    with pytest.raises(RecipeError, match=message):
        from_mergekit(config)


def test_cli_refuses_slices_in_one_line(tmp_path):
    r = run_cli("plan", _write(tmp_path, {"merge_method": "passthrough", "slices": [{"sources": []}]}), "-o", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "slices" in r.stderr and len([line for line in r.stderr.splitlines() if line.strip()]) <= 2


def test_plan_explain_prints_the_native_recipe_and_apply_runs_it(merge_family, tmp_path):
    f = {k: str(v) for k, v in merge_family.items()}
    cfg = _write(tmp_path, {"merge_method": "task_arithmetic", "base_model": f["base"], "dtype": "float32",
                            "models": [{"model": f["math"], "parameters": {"weight": 0.5}},
                                       {"model": f["code"], "parameters": {"weight": 0.25}}],
                            "parameters": {"lambda": 2.0}})
    r = run_cli("plan", cfg, str(tmp_path / "out"), "--explain")
    assert r.returncode == 0, r.stderr
    assert "mergekit config" in r.stdout
    native = yaml.safe_load(r.stdout.split("# the native weightx recipe:\n", 1)[1])
    assert [d["weight"] for d in native["deltas"]] == [1.0, 0.5] and native["combine"] == "sum"
    # The printed native recipe is itself a valid recipe, and `apply` of the mergekit file gives
    # base + Σ λ·w_i·δ_i (numpy).
    assert load_recipe(native).combine.op == "sum"
    r = run_cli("apply", cfg, str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = load_state_dict(tmp_path / "out")
    sd = {k: load_state_dict(merge_family[k]) for k in ("base", "math", "code")}
    for name, o in out.items():
        b = sd["base"][name].double().numpy()
        expected = b + 1.0 * (sd["math"][name].double().numpy() - b) + 0.5 * (sd["code"][name].double().numpy() - b)
        assert np.allclose(o.double().numpy(), expected, rtol=1e-5, atol=1e-6), name


def test_relative_paths_are_read_from_the_working_directory(merge_family, tmp_path, monkeypatch):
    monkeypatch.chdir(merge_family["base"].parent)
    native, _ = from_mergekit({"merge_method": "linear", "models": [{"model": merge_family["math"].name},
                                                                    {"model": merge_family["code"].name}]})
    assert native["models"]["math"] == str(merge_family["math"].resolve())
    assert native["models"]["code"] == str(merge_family["code"].resolve())
    native, _ = from_mergekit({"merge_method": "linear", "models": [{"model": "org/not-here"}, {"model": "org2/not-here"}]})
    assert set(native["models"].values()) == {"org/not-here", "org2/not-here"}  # Hub ids stay ids
    assert len(native["models"]) == 2  # two models with the same basename get two aliases


def test_tokenizer_source_union_becomes_a_tokenizer_block():
    recipe, notes = from_mergekit({"merge_method": "ties", "base_model": "b", "tokenizer_source": "union",
                                   "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}}]})
    assert recipe["tokenizer"] == {"source": "union"} and any("aligned by token" in n for n in notes)
