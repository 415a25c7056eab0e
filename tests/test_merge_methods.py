"""Breadcrumbs, DELLA, linear, slerp and Model Stock against float64 numpy written from the papers'
formulas (METHODS.md §6, §8) — never by calling the code under test — plus the engine's streamed
path and the recipe's one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import weightx
from weightx.combine.model_stock import stock_ratio
from weightx.edits import EDITS, TensorContext
from weightx.edits.breadcrumbs import breadcrumbs_, prepare_breadcrumbs
from weightx.errors import RecipeError
from weightx.recipe.model import load_recipe
from weightx.testing import load_state_dict
from sparsify_helpers import U32, np_hash, seed_key


def ranks_desc(x: np.ndarray) -> np.ndarray:
    """Rank of each entry by |x| descending, ties by lowest flat index (0 = largest)."""
    flat = np.abs(x.reshape(-1)).astype(np.float64)
    order = np.lexsort((np.arange(flat.size), -flat))
    r = np.empty(flat.size, dtype=np.int64)
    r[order] = np.arange(flat.size)
    return r.reshape(x.shape)


def np_breadcrumbs(x: np.ndarray, density: float, gamma: float) -> np.ndarray:
    n = x.size
    kept = max(1, int(round(density * n * 1e6)) // 1_000_000)  # ⌊d·n⌋ of the decimal, for the test's values
    top = min(int(round(gamma * n * 1e6)) // 1_000_000, n - kept)
    r = ranks_desc(x)
    return np.where((r >= top) & (r < top + kept), x, 0).astype(np.float64)


# ---------------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_methods_example_keeps_50_without_the_largest():
    """METHODS §8: n = 100, density 0.5, gamma 0.01 → 50 kept, excluding the single largest."""
    x = torch.tensor(np.random.default_rng(0).standard_normal(100), dtype=torch.float32)
    out = breadcrumbs_(x.clone(), 0.5, 0.01)
    kept = out != 0
    assert int(kept.sum()) == 50
    assert not kept[int(x.abs().argmax())]
    assert np.array_equal(out.numpy(), np_breadcrumbs(x.numpy(), 0.5, 0.01).astype(np.float32))


@pytest.mark.parametrize("density,gamma", [(0.2, 0.05), (0.5, 0.0), (0.9, 0.3), (0.013, 0.01)])
def test_breadcrumbs_golden_and_streamed_blocks_equal_whole(density, gamma):
    g = np.random.default_rng(1)
    # bf16-valued deltas: many exact ties, so the tie rule matters.
    x = torch.tensor(g.standard_normal(6000), dtype=torch.bfloat16).float()
    whole = breadcrumbs_(x.clone(), density, gamma)
    assert np.array_equal(whole.numpy(), np_breadcrumbs(x.numpy(), density, gamma).astype(np.float32))
    for block in (1000, 777, 6000):
        ranges = [(s, min(block, x.numel() - s)) for s in range(0, x.numel(), block)]
        state = prepare_breadcrumbs(lambda: ((s, [x[s:s + c].clone()]) for s, c in ranges), x.numel(), density, gamma)
        got = torch.cat([breadcrumbs_(x[s:s + c].clone(), density, gamma, state, s) for s, c in ranges])
        assert torch.equal(got, whole), block


def test_breadcrumbs_gamma_zero_or_tiny_tensors_never_empty_the_delta():
    """mergekit's old `indices[n_bot:-n_top]` emptied the tensor when ⌊γ·n⌋ = 0; weightx keeps
    the top ⌊density·n⌋ there (plain magnitude pruning)."""
    x = torch.arange(1, 65, dtype=torch.float32)  # 64 entries: ⌊0.01·64⌋ = 0 outliers
    out = breadcrumbs_(x.clone(), 0.25, 0.01)
    assert torch.equal(out != 0, x > 48)


def test_breadcrumbs_rejects_gamma_out_of_range():
    with pytest.raises(Exception, match="gamma must satisfy"):
        EDITS["breadcrumbs"](density=0.5, gamma=1.5)


# ---------------------------------------------------------------------------------------- della


def np_della(x: np.ndarray, density: float, eps: float, key: int, rescale: str = "inverse_keep") -> tuple[np.ndarray, np.ndarray]:
    c = x.shape[-1]
    rows = x.reshape(-1, c).astype(np.float64)
    p = np.empty_like(rows)
    for i, row in enumerate(rows):
        order = np.lexsort((np.arange(c), np.abs(row)))  # ascending, ties by index
        rank = np.empty(c)
        rank[order] = np.arange(c)
        p[i] = density - eps + 2 * eps * rank / (c - 1)
    u = (np_hash(key, 0, x.size) >> U32(8)).astype(np.float64).reshape(rows.shape) / 2.0**24
    keep = u < p
    out = np.where(keep, rows / p if rescale == "inverse_keep" else rows, 0.0)
    return out.reshape(x.shape), p.reshape(x.shape)


@pytest.mark.parametrize("rescale", ["inverse_keep", "none"])
def test_della_golden_probabilities_in_range_and_rising_with_magnitude(rescale):
    g = np.random.default_rng(2)
    x = g.standard_normal((37, 64)).astype(np.float32)
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", x.shape, delta="math")
    out = EDITS["della"](density=0.4, epsilon=0.2, rescale=rescale).apply(torch.tensor(x), ctx).numpy()
    expected, p = np_della(x, 0.4, 0.2, seed_key(None, ctx.name, "math"), rescale)
    assert np.allclose(out, expected, rtol=2e-7, atol=0)
    assert p.min() == pytest.approx(0.2) and p.max() == pytest.approx(0.6)
    for row, prow in zip(np.abs(x), p):  # larger |x| → larger keep probability
        assert np.all(np.diff(prow[np.argsort(row, kind="stable")]) > 0)


def test_della_is_unbiased_with_inverse_keep():
    """E[out] = δ: the mean over 400 independent masks (delta aliases) is within 5σ of δ."""
    x = torch.tensor(np.random.default_rng(3).standard_normal((4, 50)), dtype=torch.float32)
    d = EDITS["della"](density=0.3, epsilon=0.1)
    outs = np.stack([d.apply(x.clone(), TensorContext("w", tuple(x.shape), delta=f"m{i}")).numpy() for i in range(400)])
    _, p = np_della(x.numpy(), 0.3, 0.1, 0)
    sigma = np.abs(x.numpy()) * np.sqrt((1 - p) / p) / math.sqrt(400)
    assert np.all(np.abs(outs.mean(0) - x.numpy()) < 5 * sigma + 1e-6)


def test_della_l1_rescale_keeps_the_l1_norm():
    x = torch.tensor(np.random.default_rng(4).standard_normal((8, 100)), dtype=torch.float32)
    out = EDITS["della"](density=0.5, rescale="l1").apply(x.clone(), TensorContext("w", (8, 100), delta="a"))
    assert float(out.abs().sum()) == pytest.approx(float(x.abs().sum()), rel=1e-5)
    assert 0.3 < float((out != 0).float().mean()) < 0.7


def test_della_rejects_probabilities_outside_0_1():
    with pytest.raises(Exception, match="density - epsilon"):
        EDITS["della"](density=0.1, epsilon=0.15)


# ------------------------------------------------------------------------------------ combines


@pytest.fixture(scope="module")
def fam(merge_family):
    return {k: load_state_dict(merge_family[k]) for k in ("base", "math", "code")}


def _run(merge_family, tmp_path, combine, deltas=(("math", 1.0), ("code", 1.0)), edits=None):
    doc = {
        "models": {k: str(merge_family[k]) for k in ("base", "math", "code")},
        "base": "base",
        "deltas": [{"model": m, "weight": w, **({"edits": edits} if edits else {})} for m, w in deltas],
        "combine": combine,
        "output": {"path": str(tmp_path / "out"), "dtype": "float32"},
    }
    return load_state_dict(weightx.apply(doc).path)


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


@pytest.mark.parametrize("normalize,base_weight", [(True, 0.0), (True, 0.5), (False, 0.0), (False, 0.25)])
def test_linear_is_the_weighted_average_of_the_models(merge_family, fam, tmp_path, normalize, base_weight):
    out = _run(merge_family, tmp_path, {"linear": {"normalize": normalize, "base_weight": base_weight}},
               deltas=(("math", 0.3), ("code", 0.9)))
    for name, o in out.items():
        b, m, c = (_f64(fam[k][name]) for k in ("base", "math", "code"))
        total = base_weight * b + 0.3 * m + 0.9 * c
        expected = total / (base_weight + 1.2) if normalize else total
        assert np.allclose(_f64(o), expected, rtol=1e-5, atol=1e-6), name


def np_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    a, b = v0.reshape(-1), v1.reshape(-1)
    n0, n1 = np.linalg.norm(a) or 1.0, np.linalg.norm(b) or 1.0
    dot = np.clip(np.dot(a / n0, b / n1), -1, 1)
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = np.arccos(dot)
    return (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp_golden_and_exact_at_the_ends(merge_family, fam, tmp_path, t):
    out = _run(merge_family, tmp_path, {"slerp": {"t": t}}, deltas=(("math", 1.0),))
    angled = 0
    for name, o in out.items():
        b, m = _f64(fam["base"][name]), _f64(fam["math"][name])
        assert np.allclose(_f64(o), np_slerp(t, b, m), rtol=1e-5, atol=1e-6), name
        if t == 0.0:
            assert torch.equal(o, fam["base"][name].float()), name
        if t == 1.0:
            assert torch.equal(o, fam["math"][name].float()), name
        bn, mn = b.reshape(-1) / np.linalg.norm(b), m.reshape(-1) / np.linalg.norm(m)
        angled += abs(np.dot(bn, mn)) <= 0.9995
    assert angled > 0  # some tensors take the spherical branch, not only the linear fallback


def test_model_stock_ratio_checks_from_the_paper():
    """METHODS §8: t(N=2, cos .5) = 2/3, t(N=3, cos .5) = 0.75, t(cos 0) = 0, t(cos 1) = 1."""
    e = np.eye(3)
    def vecs(cos: float, n: int) -> list[torch.Tensor]:
        # n unit vectors with pairwise cosine `cos`: a shared part and orthogonal parts.
        s, o = math.sqrt(cos), math.sqrt(1 - cos)
        return [torch.tensor(np.concatenate([[s], o * e[i]])) for i in range(n)]
    assert float(stock_ratio(vecs(0.5, 2), False)) == pytest.approx(2 / 3)
    assert float(stock_ratio(vecs(0.5, 3), False)) == pytest.approx(0.75)
    assert float(stock_ratio(vecs(0.0, 2), False)) == pytest.approx(0.0)
    assert float(stock_ratio(vecs(1.0, 3), False)) == pytest.approx(1.0)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_golden(merge_family, fam, tmp_path, filter_wise):
    out = _run(merge_family, tmp_path, {"model_stock": {"filter_wise": filter_wise}})
    for name, o in out.items():
        b, m, c = (_f64(fam[k][name]) for k in ("base", "math", "code"))
        width = b.shape[-1] if filter_wise else b.size
        dm, dc = (m - b).reshape(-1, width), (c - b).reshape(-1, width)
        cos = np.clip((dm * dc).sum(-1) / np.maximum(np.linalg.norm(dm, axis=-1) * np.linalg.norm(dc, axis=-1), 1e-6), -1, 1)
        t = np.where(np.abs(1 + cos) < 1e-6, 0.0, 2 * cos / np.where(np.abs(1 + cos) < 1e-6, 1, 1 + cos))[:, None]
        expected = b + (t * (dm + dc) / 2).reshape(b.shape)
        assert np.allclose(_f64(o), expected, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("combine,deltas,message", [
    ({"slerp": {"t": 0.5}}, [("math", 1.0), ("code", 1.0)], "exactly one delta"),
    ({"model_stock": {}}, [("math", 1.0)], "at least 2 deltas"),
    ({"linear": {}}, [("math", 1.0), ("code", -1.0)], "sum of the weights"),
    ({"nuslerp": {}}, [("math", 1.0)], "set t"),
    ({"sce": {}}, [("math", 1.0)], "got 1"),
])
def test_combines_refuse_unusable_delta_counts_and_weights_in_one_line(merge_family, tmp_path, combine, deltas, message):
    doc = {
        "models": {k: str(merge_family[k]) for k in ("base", "math", "code")}, "base": "base",
        "deltas": [{"model": m, "weight": w} for m, w in deltas], "combine": combine,
        "output": {"path": str(tmp_path / "out")},
    }
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(doc)
    assert "combine" in str(err.value)


def test_della_then_ties_and_breadcrumbs_then_sum_run_through_the_engine(merge_family, fam, tmp_path):
    """mergekit's `della` (MagPrune, then TIES's election) and `breadcrumbs` (then a sum) as recipes:
    the breadcrumbs merge equals the numpy reference tensor by tensor."""
    out = _run(merge_family, tmp_path, "sum", edits=[{"breadcrumbs": {"density": 0.3, "gamma": 0.05}}])
    for name, o in out.items():
        b = _f64(fam["base"][name])
        expected = b + sum(np_breadcrumbs(_f64(fam[k][name]).astype(np.float32) - fam["base"][name].float().numpy(), 0.3, 0.05)
                           for k in ("math", "code"))
        assert np.allclose(_f64(o), expected, rtol=1e-6, atol=1e-7), name
    out = _run(merge_family, tmp_path / "d", {"ties": {"density": 1.0}}, edits=[{"della": {"density": 0.5, "epsilon": 0.1}}])
    changed = sum(int((o != fam["base"][n].float()).sum()) for n, o in out.items())
    total = sum(o.numel() for o in out.values())
    assert 0.3 * total < changed < 0.95 * total


# ---------------------------------------------------------------------------------- nuslerp, sce


def np_nuslerp(t: float, a: np.ndarray, b: np.ndarray, flatten: bool = True, row_wise: bool = False) -> np.ndarray:
    shape = a.shape
    if flatten or a.ndim < 2:
        x, y = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        x, y = np.swapaxes(a, 0, -1), np.swapaxes(b, 0, -1)
    else:
        x, y = a, b
    nx = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
    ny = np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-7)
    cos = np.clip(((x / nx) * (y / ny)).sum(-1, keepdims=True), -1, 1)
    th = np.arccos(cos)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (np.sin((1 - t) * th) * x + np.sin(t * th) * y) / np.sin(th)
    out = np.where(1 - cos**2 <= 1e-16, (1 - t) * x + t * y, out)
    if row_wise and not flatten and a.ndim >= 2:
        out = np.swapaxes(out, 0, -1)
    return out.reshape(shape)


@pytest.mark.parametrize("opts", [{}, {"flatten": False}, {"flatten": False, "row_wise": True}, {"t": 0.9}])
def test_nuslerp_of_two_task_vectors(merge_family, fam, tmp_path, opts):
    """θ_base + slerp(t, δ_math, δ_code), t = w_code/(w_math + w_code) = 0.75 unless given."""
    out = _run(merge_family, tmp_path, {"nuslerp": opts}, deltas=(("math", 1.0), ("code", 3.0)))
    t = opts.get("t", 0.75)
    for name, o in out.items():
        b, m, c = (_f64(fam[k][name]) for k in ("base", "math", "code"))
        expected = b + np_nuslerp(t, m - b, c - b, opts.get("flatten", True), opts.get("row_wise", False))
        assert np.allclose(_f64(o), expected, rtol=1e-5, atol=1e-6), name


def test_nuslerp_of_the_base_and_one_model(merge_family, fam, tmp_path):
    out = _run(merge_family, tmp_path, {"nuslerp": {"t": 0.3}}, deltas=(("math", 1.0),))
    for name, o in out.items():
        b, m = _f64(fam["base"][name]), _f64(fam["math"][name])
        assert np.allclose(_f64(o), np_nuslerp(0.3, b, m), rtol=1e-5, atol=1e-6), name


def np_sce(ds: list[np.ndarray], topk: float) -> np.ndarray:
    tv = np.stack([d.reshape(-1) for d in ds]).astype(np.float64)
    if topk < 1:
        var = tv.var(axis=0).astype(np.float32).astype(np.float64)
        k = int(np.floor(round(topk * np.count_nonzero(var), 9)))
        order = np.lexsort((np.arange(var.size), -var))
        mask = np.zeros(var.size, bool)
        mask[order[:k]] = True
        tv = tv * mask
    sq = (tv**2).mean(1)
    w = np.full(len(ds), 1 / len(ds)) if abs(sq.sum()) < 1e-6 else sq / sq.sum()
    maj = np.where(tv.sum(0) >= 0, 1.0, -1.0)
    ew = w[:, None] * (np.sign(tv) == maj)
    return ((tv * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)).reshape(ds[0].shape)


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_golden(merge_family, fam, tmp_path, topk):
    out = _run(merge_family, tmp_path, {"sce": {"select_topk": topk}})
    for name, o in out.items():
        b = _f64(fam["base"][name])
        expected = b + np_sce([_f64(fam[k][name]) - b for k in ("math", "code")], topk)
        assert np.allclose(_f64(o), expected, rtol=1e-5, atol=1e-6), name
