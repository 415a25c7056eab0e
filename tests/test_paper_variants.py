"""The papers' exact variants, against numpy rewrites of the reference code (read, not copied):
the TIES repository's `topk_values_mask` / `resolve_sign` / `disjoint_merge` over the flattened
model, peft's `ties` election, and MergeLM's magnitude masking count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import weightx
from weightx.combine.ties import ties
from weightx.edits import EDITS, TensorContext
from weightx.pipeline.plan import natural_key
from weightx.testing import load_state_dict


def _load(merge_family):
    return {k: load_state_dict(merge_family[k]) for k in ("base", "math", "code")}


def _apply(merge_family, tmp_path, combine, weights=(1.0, 1.0), edits=None):
    doc = {
        "models": {k: str(merge_family[k]) for k in ("base", "math", "code")}, "base": "base",
        "deltas": [{"model": m, "weight": w, **({"edits": edits} if edits else {})} for m, w in zip(("math", "code"), weights)],
        "combine": combine, "output": {"path": str(tmp_path / "out"), "dtype": "float32"},
    }
    res = weightx.apply(doc)
    return load_state_dict(res.path), json.loads((res.path / "weightx.json").read_text())


# --- The TIES repository (ties_merging), rewritten in numpy -------------------------------------


def ref_topk_values_mask(m: np.ndarray, k_frac: float) -> np.ndarray:
    """Its topk_values_mask: keep |x| >= the (d − int(d·K))-th smallest of each row."""
    d = m.shape[1]
    k = d - int(d * k_frac)
    kth = np.sort(np.abs(m), axis=1)[:, k - 1:k]
    return m * (np.abs(m) >= kth)


def ref_resolve_sign(t: np.ndarray) -> np.ndarray:
    sign = np.sign(t.sum(0))
    sign[sign == 0] = np.sign(sign.sum())  # resolve_zero_signs(…, "majority")
    return sign


def ref_disjoint_mean(t: np.ndarray, sign: np.ndarray) -> np.ndarray:
    keep = np.where(sign[None] > 0, t > 0, t < 0)  # a zero elected sign reads as −
    sel = t * keep
    return sel.sum(0) / np.maximum((sel != 0).sum(0), 1)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_paper_code_over_the_whole_model(merge_family, tmp_path, density):
    sd = _load(merge_family)
    out, rec = _apply(merge_family, tmp_path, {"ties": {
        "density": density, "trim_scope": "global", "count": "reference", "zero_sign": "paper", "elect": "unweighted",
        "divide": "count", "scale": 1.3}})
    names = sorted((n for n in out if sd["base"][n].is_floating_point()), key=natural_key)
    flat = {k: np.concatenate([sd[k][n].double().numpy().reshape(-1) for n in names]) for k in sd}
    tvs = np.stack([flat["math"] - flat["base"], flat["code"] - flat["base"]])
    trimmed = ref_topk_values_mask(tvs, density)
    merged = flat["base"] + 1.3 * ref_disjoint_mean(trimmed, ref_resolve_sign(trimmed))
    got = np.concatenate([out[n].double().numpy().reshape(-1) for n in names])
    assert np.allclose(got, merged, rtol=1e-5, atol=1e-6)
    assert rec["ties_global"]["kept"] == [int(np.count_nonzero(r)) for r in trimmed]
    sums = np.sign(trimmed.sum(0))
    assert (rec["ties_global"]["elected_plus"], rec["ties_global"]["elected_minus"]) == (int((sums > 0).sum()), int((sums < 0).sum()))


def test_global_exact_count_keeps_exactly_k_over_the_model(merge_family, tmp_path):
    """`trim_scope: global` with the exact count: ⌊d·N⌋ entries of each delta over the whole model,
    ties by (tensor in plan order, flat index): the same rule as a per-tensor trim of one long vector."""
    sd = _load(merge_family)
    out, rec = _apply(merge_family, tmp_path, {"ties": {"density": 0.3, "trim_scope": "global"}}, weights=(0.5, 2.0))
    names = sorted((n for n in out if sd["base"][n].is_floating_point()), key=natural_key)
    flat = {k: np.concatenate([sd[k][n].double().numpy().reshape(-1) for n in names]) for k in sd}
    n = flat["base"].size
    k = int(np.floor(round(0.3 * n, 6)))
    trimmed = []
    for key in ("math", "code"):
        d = flat[key] - flat["base"]
        order = np.lexsort((np.arange(n), -np.abs(d)))
        keep = np.zeros(n, bool)
        keep[order[:k]] = True
        trimmed.append(np.where(keep, d, 0.0))
    w = np.array([0.5, 2.0])[:, None]
    t = np.stack(trimmed) * w
    pos = t.sum(0) >= 0  # zero_sign positive
    agree = np.where(pos, t > 0, t < 0)
    merged = flat["base"] + (t * agree).sum(0) / np.maximum((w * (agree & (t != 0))).sum(0), 0.5)
    got = np.concatenate([out[nm].double().numpy().reshape(-1) for nm in names])
    assert rec["ties_global"]["kept"] == [k, k]
    assert np.allclose(got, merged, rtol=1e-5, atol=1e-6)


def test_zero_sums_follow_the_whole_models_majority_minus_on_a_tie():
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    b = torch.tensor([-1.0, 2.0, 1.0, 0.25])
    plus = ties([a.clone(), b.clone()], [1.0, 1.0], density=1.0, zero_sign="paper", minus=False)
    minus = ties([a.clone(), b.clone()], [1.0, 1.0], density=1.0, zero_sign="paper", minus=True)
    assert plus.tolist() == [1.0, 2.0, 2.0, 0.375]  # zero sums elect +: the positive entries
    assert minus.tolist() == [-1.0, -2.0, 2.0, 0.375]


# --- peft's ties ---------------------------------------------------------------------------------


def peft_ties(deltas: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    pruned = []
    for d in deltas:
        flat = d.reshape(-1)
        k = int(density * flat.size)
        keep = np.zeros(flat.size, bool)
        keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
        pruned.append(np.where(keep, flat, 0.0))
    t = np.stack(pruned)
    majority = np.where(t.sum(0) >= 0, 1.0, -1.0)  # "total": the unweighted sum
    mask = np.sign(t) == majority
    weighted = t * np.array(weights)[:, None]
    return ((weighted * mask).sum(0) / np.maximum(mask.sum(0), 1.0)).reshape(deltas[0].shape)


def test_peft_election_unweighted_and_divided_by_count(merge_family, tmp_path):
    sd = _load(merge_family)
    out, _ = _apply(merge_family, tmp_path, {"ties": {"density": 0.5, "elect": "unweighted", "divide": "count"}}, weights=(0.6, 1.4))
    for name, o in out.items():
        b = sd["base"][name].double().numpy()
        deltas = [sd[k][name].double().numpy() - b for k in ("math", "code")]
        expected = b + peft_ties(deltas, [0.6, 1.4], 0.5)
        assert np.allclose(o.double().numpy(), expected, rtol=1e-5, atol=1e-6), name


# --- MergeLM's magnitude masking -----------------------------------------------------------------


def mergelm_magnitude(x: np.ndarray, density: float, rescale: bool) -> np.ndarray:
    """mask_input_with_mask_rate(strategy="magnitude"): drop ≤ the int(n·p)-th smallest |x|."""
    flat = x.reshape(-1).astype(np.float64)
    num = int(flat.size * (1.0 - density))
    kth = np.sort(np.abs(flat))[num - 1]
    kept = np.where(np.abs(flat) <= kth, 0.0, flat)
    return (kept / density if rescale else kept).reshape(x.shape)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.77])
@pytest.mark.parametrize("streamed", [False, True])
def test_mergelm_magnitude_count_drops_every_tie(density, streamed):
    g = np.random.default_rng(5)
    x = torch.tensor(g.standard_normal((40, 64)), dtype=torch.bfloat16).float()  # many ties
    edit = EDITS["magnitude"](density=density, rescale="inverse_keep", count="reference")
    ctx = TensorContext("w", tuple(x.shape))
    if streamed:
        flat = x.reshape(-1)
        ranges = [(s, min(300, flat.numel() - s)) for s in range(0, flat.numel(), 300)]
        state = edit.prepare(lambda: ((s, [flat[s:s + c].clone()]) for s, c in ranges), ctx)
        got = torch.cat([edit.apply(flat[s:s + c].clone(), TensorContext("w", tuple(x.shape), s, state)) for s, c in ranges])
    else:
        got = edit.apply(x.clone(), ctx).reshape(-1)
    expected = mergelm_magnitude(x.numpy(), density, True).reshape(-1)
    assert np.allclose(got.numpy(), expected, rtol=1e-6, atol=0)
    flat = np.abs(x.numpy().reshape(-1))
    num = int(flat.size * (1.0 - density))
    assert int((got != 0).sum()) == int((flat > np.sort(flat)[num - 1]).sum())  # every tie at the threshold dropped
