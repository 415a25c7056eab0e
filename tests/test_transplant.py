"""Per-delta base (transplant, Chat Vector): δ = θ_model − θ_own_base, added to the recipe's base.

Golden values are float64 numpy from the formula base_v2 + f(θ_v1 − base_v1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import weightx
from weightx.api import describe_plan
from weightx.errors import InputError, PlanError, RecipeError
from weightx.testing import load_state_dict, make_tiny_llama
from conftest import run_cli, write_recipe


def f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def bf16_ulp(x: np.ndarray) -> np.ndarray:
    return np.exp2(np.floor(np.log2(np.maximum(np.abs(x), np.finfo(np.float32).tiny))) - 7)


def transplant(family, out, edits=(), **delta) -> dict:
    """instruct_v1 = dpo (made from sft = base_v1), moved onto base_v2 = base."""
    return {
        "models": {"base_v1": str(family["sft"]), "instruct_v1": str(family["dpo"]), "base_v2": str(family["base"])},
        "base": "base_v2",
        "deltas": [{"model": "instruct_v1", "base": "base_v1", "edits": list(edits), **delta}],
        "output": {"path": str(out), "config_from": "base_v2"},
    }


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_transplant_golden(family, tmp_path, alpha):
    edits = [{"expo": {"alpha": alpha}}] if alpha is not None else []
    res = weightx.apply(transplant(family, tmp_path / "out", edits))
    v1, i1, v2 = (load_state_dict(family[k]) for k in ("sft", "dpo", "base"))
    out = load_state_dict(res.path)
    assert set(out) == set(v2)
    scale = 1.0 + (alpha or 0.0)
    moved = 0
    for name, o in out.items():
        exact = f64(v2[name]) + scale * (f64(i1[name]) - f64(v1[name]))
        slack = 8 * 2.0**-24 * (np.abs(f64(v2[name])) + scale * (np.abs(f64(i1[name])) + np.abs(f64(v1[name]))))
        assert np.all(np.abs(f64(o) - exact) <= 0.5 * bf16_ulp(exact) + slack), name
        moved += int((o != v2[name]).sum())
    assert moved > 0.5 * sum(t.numel() for t in out.values())  # the delta really landed on the new base


def test_transplant_with_dare_uses_the_deltas_own_mask(family, tmp_path):
    """DARE on a transplanted delta drops the same entries as on the same delta in place (the mask
    is keyed by the delta's alias and the tensor), and rescales the survivors of θ_v1 − base_v1."""
    p = 0.5
    res = weightx.apply(transplant(family, tmp_path / "out", [{"dare": {"drop": p}}]))
    same = {"models": {"base_v1": str(family["sft"]), "instruct_v1": str(family["dpo"])}, "base": "base_v1",
            "deltas": [{"model": "instruct_v1", "edits": [{"dare": {"drop": p}}]}],
            "output": {"path": str(tmp_path / "inplace"), "dtype": "float32"}}
    ref = load_state_dict(weightx.apply(same).path)
    v1, i1, v2 = (load_state_dict(family[k]) for k in ("sft", "dpo", "base"))
    out = load_state_dict(res.path)
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]:
        kept = (ref[name].to(torch.float64) - v1[name].to(torch.float64)) != 0
        delta = f64(i1[name]) - f64(v1[name])
        exact = f64(v2[name]) + np.where(kept.numpy(), delta / (1 - p), 0.0)
        slack = 8 * 2.0**-24 * (np.abs(f64(v2[name])) + np.abs(delta) / (1 - p))
        assert np.all(np.abs(f64(out[name]) - exact) <= 0.5 * bf16_ulp(exact) + slack), name
        assert 0.4 < float(kept.double().mean()) < 0.6


def test_transplant_plan_and_record(family, tmp_path):
    recipe = transplant(family, tmp_path / "out", [{"expo": {"alpha": 0.3}}])
    text = describe_plan(recipe)
    assert "instruct_v1 − base_v1 (onto base_v2)" in text
    assert "base·δ" in text  # base_v1's role
    res = weightx.apply(recipe)
    rec = json.loads((res.path / "weightx.json").read_text())
    assert rec["recipe"]["deltas"][0]["base"] == "base_v1"
    for alias in ("base_v1", "instruct_v1", "base_v2"):  # provenance for all three inputs
        files = rec["inputs"][alias]["files"]
        assert files and all(len(f["sha256"]) == 64 for f in files.values()), alias
    card = (res.path / "README.md").read_text()
    assert "from base_v1 through instruct_v1" in card and "added to base_v2" in card


def test_transplant_refusals(family, tmp_path):
    # an unknown alias and a delta against itself: recipe errors, all at once
    bad = transplant(family, tmp_path / "o1")
    bad["deltas"].append({"model": "base_v1", "base": "base_v1"})
    bad["deltas"][0]["base"] = "nope"
    with pytest.raises(RecipeError) as e:
        weightx.plan(bad)
    text = str(e.value)
    assert "deltas.0.base" in text and "'nope' is not defined" in text
    assert "deltas.1.model" in text and "its delta is zero" in text

    # the delta's own base has another shape: one line at plan time, naming it
    other = make_tiny_llama(tmp_path / "wide", hidden=96, intermediate=128)
    r = transplant(family, tmp_path / "o2")
    r["models"]["base_v1"] = str(other)
    with pytest.raises(PlanError, match="'base_v1'"):
        weightx.plan(r)

    # distillation needs the model the delta was trained from
    r = transplant(family, tmp_path / "o3", [{"bitdelta": {"distill": {"data": str(tmp_path / "x.txt")}}}])
    (tmp_path / "x.txt").write_text("hello world\n")
    with pytest.raises(PlanError, match="transplant"):
        weightx.plan(r)


def test_transplant_of_a_compressed_artifact(family, tmp_path):
    """A ternary artifact made against base_v1 is moved onto base_v2: its decoded delta is added there;
    naming the wrong own base is refused before compute."""
    art = weightx.apply({"models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])}, "base": "sft",
                         "deltas": [{"model": "dpo", "edits": [{"ternary": {"density": 0.3}}]}],
                         "output": {"path": str(tmp_path / "art"), "format": "delta", "dtype": "float32"}}).path
    dense = weightx.apply({"models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])}, "base": "sft",
                           "deltas": [{"model": "dpo", "edits": [{"ternary": {"density": 0.3}}]}],
                           "output": {"path": str(tmp_path / "dense"), "dtype": "float32"}}).path
    r = {"models": {"base_v1": str(family["sft"]), "art": str(art), "base_v2": str(family["base"])}, "base": "base_v2",
         "deltas": [{"model": "art", "base": "base_v1"}], "output": {"path": str(tmp_path / "moved"), "dtype": "float32",
                                                                        "config_from": "base_v2"}}
    out = load_state_dict(weightx.apply(r).path)
    v1, v2, d = (load_state_dict(p) for p in (family["sft"], family["base"], dense))
    name = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(f64(out[name]), f64(v2[name]) + (f64(d[name]) - f64(v1[name])), rtol=0, atol=1e-6)
    r["deltas"][0]["base"] = "base_v2"
    r["output"]["path"] = str(tmp_path / "wrong")
    with pytest.raises(InputError, match="not the model delta artifact 'art' was made against"):
        weightx.plan(r)


def test_transplant_cli_one_line(family, tmp_path):
    r = transplant(family, tmp_path / "o")
    r["deltas"][0]["base"] = "missing"
    proc = run_cli("plan", str(write_recipe(tmp_path / "r.yaml", r)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "deltas.0.base" in proc.stderr
