"""TIES: the METHODS.md worked example, zero-sum sign rules, weights, trimming, and the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightx
from weightx.combine import COMBINES
from weightx.edits import TensorContext
from weightx.errors import RecipeError
from weightx.recipe.model import load_recipe
from weightx.testing import load_state_dict
from sparsify_helpers import np_drop_mask, np_ties, np_topk_mask

Ties = COMBINES["ties"]
TAU = [[0.5, -0.2, 0.0, 0.1], [0.3, 0.4, -0.1, -0.1], [-0.6, 0.1, 0.0, 0.0]]


def run_ties(taus, weights=None, **kw) -> np.ndarray:
    ts = [torch.tensor(np.asarray(t), dtype=torch.float32) for t in taus]
    weights = weights or [1.0] * len(ts)
    return Ties(**kw).combine(ts, list(weights), TensorContext("w", tuple(ts[0].shape))).numpy()


def test_worked_example():
    """METHODS.md §6 / §8: no trim → elected [+, +, −, +] → merged [0.4, 0.25, −0.1, 0.1]."""
    t = np.array(TAU)
    mass = t.sum(0)
    assert np.array_equal(np.sign(mass), [1, 1, -1, 0])  # the 4th entry is a zero-sum tie → +1
    expected = np.array([(0.5 + 0.3) / 2, (0.4 + 0.1) / 2, -0.1, 0.1])  # disjoint means by hand
    assert np.allclose(expected, [0.4, 0.25, -0.1, 0.1])
    assert np.allclose(np_ties(list(t)), expected)
    assert np.allclose(run_ties(TAU, density=1.0), expected, rtol=1e-6, atol=0)


def test_zero_sum_resolution_positive_vs_majority():
    """A zero mass entry: mergekit elects +1; the paper's code elects the tensor's majority sign."""
    taus = [[0.1, -0.3, -0.2, 0.4], [-0.1, 0.1, -0.1, -0.5]]  # masses [0, −0.2, −0.3, −0.1]
    pos = run_ties(taus, density=1.0)
    maj = run_ties(taus, density=1.0, zero_sign="majority")
    assert np.isclose(pos[0], 0.1) and np.isclose(maj[0], -0.1)
    assert np.allclose(pos[1:], maj[1:])
    assert np.allclose(pos, np_ties([np.array(t) for t in taus]), rtol=1e-6)
    assert np.allclose(maj, np_ties([np.array(t) for t in taus], zero_sign="majority"), rtol=1e-6)
    # A positive majority keeps +1 for the zero entry under both rules.
    taus2 = [[0.1, 0.3, 0.2], [-0.1, 0.1, -0.1]]
    assert np.allclose(run_ties(taus2, density=1.0, zero_sign="majority"), run_ties(taus2, density=1.0))


def test_entries_where_nothing_agrees_are_zero():
    out = run_ties([[0.0, 0.0], [0.0, 0.0]], density=1.0)
    assert np.array_equal(out, [0.0, 0.0]) and not np.isnan(out).any()


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_random_against_numpy_reference(normalize, density):
    rs = np.random.default_rng(int(density * 10) + normalize)
    for trial in range(20):
        m = int(rs.integers(1, 5))
        shape = (int(rs.integers(1, 40)), int(rs.integers(1, 40)))
        taus = [rs.normal(scale=0.01, size=shape).astype(np.float32) for _ in range(m)]
        if trial % 3 == 0:  # exact zeros and sign-balanced values exercise ties and zero masses
            taus = [np.round(t * 300).astype(np.float32) / 4 for t in taus]
        # unit, mixed-sign (a divisor can cancel to 0) and positive weights (the clamp fix-up)
        weights = [None, list(rs.uniform(-0.5, 2.0, size=m)), list(rs.uniform(0.05, 2.0, size=m))][trial % 3]
        got = run_ties(taus, weights, density=density, normalize=normalize, scale=1.3)
        want = np_ties(taus, weights, density=density, normalize=normalize, scale=1.3)
        assert np.allclose(got, want, rtol=1e-5, atol=1e-7), trial
        assert np.array_equal(got != 0, want != 0), trial


def test_weights_enter_the_election():
    """Weights scale each delta before the sign vote (mergekit semantics)."""
    taus = [[0.2], [-0.3]]
    assert run_ties(taus, [1.0, 1.0], density=1.0)[0] < 0  # mass −0.1 → −
    assert np.isclose(run_ties(taus, [2.0, 1.0], density=1.0)[0], 0.2)  # mass 0.4−0.3 → +; 0.4/2
    assert np.isclose(run_ties(taus, [2.0, 1.0], density=1.0, normalize=False)[0], 0.4)


def test_trim_is_per_delta_exact_count():
    """With one delta every kept entry agrees with its own sign: TIES is then exactly the trim."""
    rs = np.random.default_rng(9)
    x = rs.normal(size=(10, 10)).astype(np.float32)
    out = run_ties([x], density=0.3)
    assert np.count_nonzero(out) == 30
    assert np.array_equal(out, np.where(np_topk_mask(x, 30), x, 0).astype(np.float32))
    # Two deltas trimmed separately: each contributes only its own top 30%.
    y = rs.normal(size=(10, 10)).astype(np.float32)
    both = run_ties([x, y], density=0.3, normalize=False)
    support = np_topk_mask(x, 30) | np_topk_mask(y, 30)
    assert np.all(both[~support] == 0)


def test_config_validation_and_elementwise():
    assert not Ties(density=0.5).elementwise
    assert Ties(density=0.5).normalize and Ties(density=0.5).zero_sign == "positive"
    base = {"models": {"a": "x", "b": "y"}, "base": "a", "deltas": [{"model": "b"}]}
    for bad in ({"ties": {"density": 0}}, {"ties": {"density": 2}}, {"ties": {"density": 0.5, "zero_sign": "minus"}}, "ties"):
        with pytest.raises(RecipeError, match="combine"):
            load_recipe({**base, "combine": bad})
    r = load_recipe({**base, "combine": {"ties": {"density": 0.2, "scale": 1.5}}})
    assert r.recipe_form()["combine"] == {"ties": {"density": 0.2, "zero_sign": "positive", "normalize": True, "scale": 1.5,
                                                   "trim_scope": "tensor", "count": "exact", "elect": "weighted",
                                                   "divide": "weights"}}
    assert load_recipe(r.recipe_form()) == r


def _merge_doc(merge_family, out, combine, edits=None, weights=(1.0, 1.0)):
    edits = edits or [[], []]
    return {
        "models": {"base": str(merge_family["base"]), "math": str(merge_family["math"]), "code": str(merge_family["code"])},
        "base": "base",
        "deltas": [{"model": m, "weight": w, "edits": e} for m, w, e in zip(("math", "code"), weights, edits)],
        "combine": combine,
        "output": {"path": str(out), "dtype": "float32"},
    }


def test_apply_ties_end_to_end(merge_family, tmp_path):
    # Weights with short binary expansions keep w·τ exact in fp32, so the float64 reference sees the
    # same masses: with 0.8/1.2, bf16 deltas such as −0.0022·0.8 + 0.00146·1.2 cancel to exactly 0
    # in one precision and not the other, flipping the elected sign at that entry.
    res = weightx.apply(_merge_doc(merge_family, tmp_path / "out", {"ties": {"density": 0.4}}, weights=(0.75, 1.25)))
    sd = {k: load_state_dict(merge_family[k]) for k in ("base", "math", "code")}
    out = load_state_dict(res.path)
    for name, o in out.items():
        base = sd["base"][name].to(torch.float32).numpy()
        taus = [sd[m][name].to(torch.float32).numpy() - base for m in ("math", "code")]
        want = base.astype(np.float64) + np_ties(taus, [0.75, 1.25], density=0.4)
        assert np.allclose(o.numpy(), want, rtol=1e-6, atol=1e-7), name


def test_dare_then_ties_is_dare_ties(merge_family, tmp_path):
    """`dare` edits followed by `ties` = MergeLM's DARE-TIES (DARE each delta, then TIES)."""
    dare = [[{"dare": {"drop": 0.5, "seed": s}}] for s in (1, 2)]
    res = weightx.apply(_merge_doc(merge_family, tmp_path / "out", {"ties": {"density": 0.6}}, edits=dare))
    sd = {k: load_state_dict(merge_family[k]) for k in ("base", "math", "code")}
    out = load_state_dict(res.path)
    for name, o in out.items():
        base = sd["base"][name].to(torch.float32).numpy()
        taus = []
        for m, s in (("math", 1), ("code", 2)):
            d = sd[m][name].to(torch.float32).numpy() - base
            mask = np_drop_mask(s, name, d.size, 0.5).reshape(d.shape)
            taus.append(np.where(mask, 0.0, d.astype(np.float64) * 2.0).astype(np.float32))
        want = base.astype(np.float64) + np_ties(taus, density=0.6)
        assert np.allclose(o.numpy(), want, rtol=1e-6, atol=1e-7), name


def test_dare_ties_recipe_runs(merge_family, tmp_path):
    """recipes/dare-ties.yaml with local stand-ins for the three Hub models."""
    from conftest import REPO

    r = load_recipe(REPO / "recipes" / "dare-ties.yaml", [
        f"models.llama2={merge_family['base']}", f"models.lm={merge_family['math']}",
        f"models.math={merge_family['code']}", "output.dtype=float32",
    ])
    assert r.combine.op == "ties" and all(d.edits[0].op == "dare" for d in r.deltas)
    drop, density = r.deltas[0].edits[0].drop, r.combine.density
    out = load_state_dict(weightx.apply(r, output=tmp_path / "out").path)
    sd = {k: load_state_dict(merge_family[k]) for k in ("base", "math", "code")}
    for name, o in out.items():
        base = sd["base"][name].to(torch.float32).numpy()
        taus = []
        for m, d in zip(("math", "code"), r.deltas):
            delta = sd[m][name].to(torch.float32).numpy() - base
            mask = np_drop_mask(d.edits[0].seed, name, delta.size, drop).reshape(delta.shape)
            taus.append((np.where(mask, 0.0, delta.astype(np.float64) / (1 - drop))).astype(np.float32))
        want = base.astype(np.float64) + np_ties(taus, [d.weight for d in r.deltas], density=density)
        assert np.allclose(o.numpy(), want, rtol=1e-6, atol=1e-7), name
