"""Recipe parsing: typed, unknown keys rejected, every problem reported at once, overrides."""

from __future__ import annotations


import pytest

import weightx
from weightx.errors import RecipeError, UsageError
from weightx.recipe.model import load_recipe
from conftest import REPO, run_cli, write_recipe

GOOD = {
    "models": {"sft": "a", "dpo": "b"},
    "base": "sft",
    "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": 0.3}}]}],
    "output": {"path": "out"},
}


def test_all_recipes_in_repo_validate():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert any(p.name == "quickstart.yaml" for p in recipes) and any(p.name == "expo-zephyr.yaml" for p in recipes)
    for path in recipes:
        load_recipe(path)


def test_expo_zephyr_documents_the_paper_setup():
    r = load_recipe(REPO / "recipes" / "expo-zephyr.yaml")
    assert r.models == {"sft": "HuggingFaceH4/mistral-7b-sft-beta", "dpo": "HuggingFaceH4/zephyr-7b-beta"}
    assert r.base == "sft" and r.deltas[0].edits[0].alpha == 0.1


def test_python_api_objects():
    r = weightx.Recipe.model_validate(GOOD)
    assert r.deltas[0].edits[0].op == "expo" and r.combine.op == "sum"
    assert r.recipe_form()["deltas"][0]["edits"] == [{"expo": {"alpha": 0.3}}]
    assert load_recipe(r.recipe_form()) == r


def test_every_problem_reported_at_once():
    bad = {
        "models": {"sft": "a", "dpo": "b"},
        "base": "sft",
        "colour": "red",
        "deltas": [{"model": "dpx", "edits": [{"expo": {"alpha": "lots"}}, {"explode": {}}]}],
        "output": {"path": "out"},
    }
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    text = str(e.value)
    assert "4 problems" in text
    assert "unknown key 'colour'" in text
    assert "deltas.0.edits.0.expo.alpha" in text and "valid number" in text
    assert "unknown edit 'explode'" in text
    assert "deltas.0.model: 'dpx' is not defined under models" in text


def test_overrides():
    r = load_recipe(GOOD, ["deltas.0.edits.0.expo.alpha=0.5", "output.dtype=float16", "name=x"])
    assert r.deltas[0].edits[0].alpha == 0.5 and r.output.dtype == "float16" and r.name == "x"
    with pytest.raises(UsageError, match="not an index"):
        load_recipe(GOOD, ["deltas.3.weight=2"])
    with pytest.raises(UsageError, match="key.path=value"):
        load_recipe(GOOD, ["nonsense"])
    with pytest.raises(RecipeError, match="unknown key 'colour'"):
        load_recipe(GOOD, ["colour=red"])


def test_yaml_alias_bomb_fails_fast(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines))
    with pytest.raises(UsageError, match="aliases"):
        load_recipe(p)
    # Few aliases that still expand to millions of nodes are refused too.
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)
    ]
    p.write_text("\n".join(lines))
    with pytest.raises(UsageError, match="expands to more than"):
        load_recipe(p)


@pytest.mark.slow
def test_cli_bad_recipe_one_message_exit_2(tmp_path):
    bad = dict(GOOD, colour="red", base="nope")
    bad["deltas"] = [{"model": "dpo", "edits": [{"expo": {"alpha": "x"}}, {"foo": {}}]}]
    r = run_cli("apply", str(write_recipe(tmp_path / "r.yaml", bad)))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("error:") == 1
    for needle in ("unknown key 'colour'", "alpha", "unknown edit 'foo'", "'nope' is not defined"):
        assert needle in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("content, needle", [("models: [", "invalid YAML"), ("- just a list", "YAML mapping")])
def test_cli_malformed_yaml(tmp_path, content, needle):
    p = tmp_path / "r.yaml"
    p.write_text(content)
    r = run_cli("plan", str(p))
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_missing_recipe_file(tmp_path):
    r = run_cli("apply", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
