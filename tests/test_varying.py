"""Per-tensor parameters: mergekit's gradients over layers and name filters, in native recipes."""

from __future__ import annotations

import numpy as np
import pytest

import weightx
from weightx.errors import RecipeError
from weightx.recipe.model import load_recipe
from weightx.recipe.varying import evaluate, layer_positions
from weightx.testing import load_state_dict
from test_merge_methods import np_slerp


def np_gradient(values: list[float], t: float) -> float:
    """mergekit's spread of a list over t ∈ [0, 1], written from its description."""
    if len(values) == 1:
        return values[0]
    s = t * (len(values) - 1)
    lo = int(np.floor(s))
    hi = min(lo + 1, len(values) - 1)
    return (1 - (s - lo)) * values[lo] + (s - lo) * values[hi]


def test_layer_positions_follow_mergekit():
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["vision.blocks.0.w", "vision.blocks.1.w", "solo.0.w"]
    t = layer_positions(names)
    assert [t[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert t["model.embed_tokens.weight"] == t["lm_head.weight"] == t["model.norm.weight"] == 0
    assert (t["vision.blocks.0.w"], t["vision.blocks.1.w"]) == (0, 1)  # its own stack
    assert t["solo.0.w"] == 1  # a stack of one layer: t = 1, as mergekit


@pytest.mark.parametrize("t", [0, 0.1, 0.25, 0.6, 1])
def test_gradient_and_filters_evaluate_like_mergekit(t):
    g = [0, 0.5, 0.3, 0.7, 1]
    assert evaluate({"gradient": g}, "x", t) == pytest.approx(np_gradient(g, t))
    setting = [{"filter": "self_attn", "value": {"gradient": g}}, {"filter": "mlp", "value": 0.2}, {"value": 0.5}]
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", t) == pytest.approx(np_gradient(g, t))
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", t) == 0.2
    assert evaluate(setting, "model.norm.weight", t) == 0.5


def _doc(merge_family, tmp_path, combine, deltas):
    return {
        "models": {k: str(merge_family[k]) for k in ("base", "math", "code")}, "base": "base",
        "deltas": deltas, "combine": combine, "output": {"path": str(tmp_path / "out"), "dtype": "float32"},
    }


def test_canonical_mergekit_slerp_config_per_tensor(merge_family, tmp_path):
    """Different t gradients for self_attn and mlp, 0.5 elsewhere: every tensor is the slerp at its
    own t (numpy, from mergekit's rules), and weightx.json records the settings as written."""
    attn, mlp = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
    t_setting = [{"filter": "self_attn", "value": {"gradient": attn}}, {"filter": "mlp", "value": {"gradient": mlp}}, {"value": 0.5}]
    res = weightx.apply(_doc(merge_family, tmp_path, {"slerp": {"t": t_setting}}, [{"model": "math"}]))
    out = load_state_dict(res.path)
    base, math_ = load_state_dict(merge_family["base"]), load_state_dict(merge_family["math"])
    pos = layer_positions(out)
    seen = set()
    for name, o in out.items():
        g = attn if "self_attn" in name else mlp if "mlp" in name else None
        t = np_gradient(g, pos[name]) if g else 0.5
        seen.add(round(t, 6))
        b, m = base[name].double().numpy(), math_[name].double().numpy()
        assert np.allclose(o.double().numpy(), np_slerp(t, b, m), rtol=1e-5, atol=1e-6), name
    assert len(seen) >= 3
    import json
    rec = json.loads((res.path / "weightx.json").read_text())
    assert rec["recipe"]["combine"]["slerp"]["t"] == t_setting


def test_gradient_weights_and_edit_parameters(merge_family, tmp_path):
    """A delta weight and a magnitude density given as gradients over the layers."""
    doc = _doc(merge_family, tmp_path, "sum", [
        {"model": "math", "weight": {"gradient": [0.2, 1.0]}, "edits": [{"magnitude": {"density": {"gradient": [0.1, 0.9]}}}]},
    ])
    out = load_state_dict(weightx.apply(doc).path)
    base, math_ = load_state_dict(merge_family["base"]), load_state_dict(merge_family["math"])
    pos = layer_positions(out)
    for name, o in out.items():
        t = pos[name]
        w, d = np_gradient([0.2, 1.0], t), np_gradient([0.1, 0.9], t)
        delta = (math_[name].float() - base[name].float()).numpy().reshape(-1)
        k = max(1, int(np.floor(round(d * delta.size, 6))))
        order = np.lexsort((np.arange(delta.size), -np.abs(delta)))
        kept = np.zeros(delta.size, bool)
        kept[order[:k]] = True
        expected = base[name].double().numpy().reshape(-1) + w * np.where(kept, delta, 0)
        assert np.allclose(o.double().numpy().reshape(-1), expected, rtol=1e-5, atol=1e-6), name


def test_bad_gradients_and_filters_are_reported_together(merge_family, tmp_path):
    doc = _doc(merge_family, tmp_path, {"ties": {"density": {"gradient": [0.5, 1.5]}}}, [
        {"model": "math", "edits": [{"dare": {"drop": [{"filter": "mlp", "value": 0.5}]}}]},
        {"model": "code", "weight": {"gradient": []}},
    ])
    with pytest.raises(RecipeError) as err:
        load_recipe(doc)
    text = str(err.value)
    assert "end the filter list" in text and "non-empty list of numbers" in text


def test_out_of_range_endpoint_is_one_located_line(merge_family, tmp_path):
    doc = _doc(merge_family, tmp_path, {"ties": {"density": {"gradient": [0.5, 1.5]}}}, [{"model": "math"}, {"model": "code"}])
    with pytest.raises(RecipeError, match=r"combine\.ties\.density.*density must satisfy"):
        load_recipe(doc)


def test_a_plain_list_is_still_a_sweep(merge_family, tmp_path):
    doc = _doc(merge_family, tmp_path, "sum", [{"model": "math", "edits": [{"expo": {"alpha": [0.1, 0.2]}}]}])
    doc["validate"] = {"tasks": ["weightx_smoke"], "select": "weightx_smoke/acc"}
    r = load_recipe(doc)
    assert r.sweep is not None and not r.varying


def test_plan_prints_the_values_a_parameter_takes(merge_family, tmp_path):
    from conftest import run_cli, write_recipe

    doc = _doc(merge_family, tmp_path, "sum", [{"model": "math", "edits": [{"expo": {"alpha": {"gradient": [0.0, 1.0]}}}]}])
    r = run_cli("plan", str(write_recipe(tmp_path / "r.yaml", doc)))
    assert r.returncode == 0, r.stderr
    assert "deltas.0.edits.0.expo.alpha varies by tensor" in r.stdout


def test_model_card_states_varying_parameters_as_written(merge_family, tmp_path):
    """The card never prints one value of a parameter that varies by tensor as if it were the only one."""
    import json

    from weightx.pipeline.card import summary

    doc = _doc(merge_family, tmp_path, "sum", [
        {"model": "math", "weight": {"gradient": [0.2, 1.0]}, "edits": [{"magnitude": {"density": {"gradient": [0.1, 0.9]}}}]},
    ])
    res = weightx.apply(doc)
    text = summary(json.loads((res.path / "weightx.json").read_text()))
    assert "[0.1, 0.9]" in text and "[0.2, 1.0]" in text
    assert "top 0.1" not in text
