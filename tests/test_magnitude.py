"""Magnitude pruning and the exact top-k selection under it, against a full numpy sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightx
from weightx.kernels import topk
from weightx.edits import EDITS, TensorContext
from weightx.errors import RecipeError
from weightx.recipe.model import load_recipe
from weightx.testing import load_state_dict
from sparsify_helpers import np_keep_count, np_topk_mask

Magnitude = EDITS["magnitude"]


def run_mag(x: np.ndarray, **kw) -> np.ndarray:
    t = torch.tensor(x, dtype=torch.float32)
    return Magnitude(**kw).apply(t, TensorContext("w", tuple(t.shape))).numpy()


def test_mergelm_magnitude_variant_golden():
    """METHODS.md §8 DARE 6: x = [0.1, −0.4, 0.05, 0.3, −0.2], p = 0.6 drops the 3 smallest →
    [0, −0.4, 0, 0.3, 0], rescaled by 1/(1−p) → [0, −1.0, 0, 0.75, 0]."""
    x = np.array([0.1, -0.4, 0.05, 0.3, -0.2])
    p = 0.6
    keep = np.abs(x) > np.sort(np.abs(x))[int(x.size * p) - 1]  # MergeLM: drop |x| <= kth
    assert np.array_equal(np.where(keep, x, 0), [0, -0.4, 0, 0.3, 0])
    assert np.allclose(np.where(keep, x, 0) / (1 - p), [0, -1.0, 0, 0.75, 0])
    assert np.allclose(run_mag(x, density=0.4), [0, -0.4, 0, 0.3, 0], rtol=1e-7, atol=0)
    assert np.allclose(run_mag(x, density=0.4, rescale="inverse_keep"), [0, -1.0, 0, 0.75, 0], rtol=1e-6, atol=0)


@pytest.fixture(params=["numpy", "torch"])
def gathers(request, monkeypatch):
    """The CPU compare/gather steps run in numpy (fast) or torch (the CUDA code path): same answer."""
    monkeypatch.setattr(topk, "NUMPY_ON_CPU", request.param == "numpy")
    return request.param


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "tiny"])
def test_topk_mask_equals_a_full_stable_sort(kind, gathers):
    rs = np.random.default_rng({"normal": 0, "ties": 1, "zeros": 2, "tiny": 3}[kind])
    for trial in range(60):
        n = int(rs.integers(1, 400))
        if kind == "normal":
            x = rs.normal(scale=0.01, size=n)
        elif kind == "ties":  # many equal magnitudes of both signs: tie-breaking by index decides
            x = rs.integers(-4, 5, size=n) * 0.25
        elif kind == "zeros":  # mostly zeros, and −0.0
            x = np.where(rs.random(n) < 0.8, 0.0, rs.normal(size=n)) * np.where(rs.random(n) < 0.5, -1, 1)
        else:  # subnormals and neighbours in the same radix bucket
            x = (rs.integers(1, 50, size=n) * np.float32(1e-40)).astype(np.float64) * rs.choice([-1, 1], n)
        x = x.astype(np.float32)
        k = int(rs.integers(0, n + 1))
        got = topk.topk_mask(torch.tensor(x), k).numpy()
        assert got.sum() == k
        assert np.array_equal(got, np_topk_mask(x, k)), (kind, trial)


def test_trim_in_place_equals_the_mask(gathers):
    """`trim_` (int32 bit ops on the float bits) gives the same values as x · topk_mask(x, k)."""
    rs = np.random.default_rng(7)
    for trial in range(300):
        n = int(rs.integers(1, 300))
        x = (rs.integers(-3, 4, size=n) * 0.5 if trial % 2 else rs.normal(size=n)).astype(np.float32)
        if trial % 5 == 0:
            x[rs.random(n) < 0.5] = -0.0
        density = float(rs.choice([0.05, 0.2, 0.5, 0.9, 1.0]))
        t = torch.tensor(x)
        topk.trim_(t, density)
        want = np.where(np_topk_mask(x, np_keep_count(density, n)), x, 0)
        assert np.array_equal(t.numpy(), want), trial
        assert not np.signbit(t.numpy()[want == 0]).any() or density == 1.0  # dropped → +0.0


def test_keep_count_is_exact_in_decimal_and_at_least_one():
    assert topk.keep_count(0.29, 100) == 29  # int(0.29 * 100) == 28 in floating point
    assert int(0.29 * 100) == 28
    assert topk.keep_count(0.5, 7) == 3 and topk.keep_count(0.01, 64) == 1 and topk.keep_count(1.0, 9) == 9
    for d in (0.1, 0.2, 0.3, 0.7, 0.9, 0.33):
        for n in (1, 10, 100, 1000, 4096, 12345):
            assert topk.keep_count(d, n) == np_keep_count(d, n)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.77, 1.0])
def test_magnitude_keeps_exact_count_and_values(density):
    x = np.random.default_rng(5).normal(size=(123, 45)).astype(np.float32)
    out = run_mag(x, density=density)
    k = np_keep_count(density, x.size)
    mask = np_topk_mask(x, k)
    assert np.count_nonzero(out) == k
    assert np.array_equal(out, np.where(mask, x, 0).astype(np.float32))


def test_magnitude_ties_broken_by_lowest_index():
    x = np.array([0.5, -0.5, 0.5, 0.1, -0.5, 0.5], np.float32)
    assert np.array_equal(run_mag(x, density=0.5), [0.5, -0.5, 0.5, 0, 0, 0])


def test_magnitude_l1_rescale():
    x = np.random.default_rng(6).normal(size=1000).astype(np.float32)
    out = run_mag(x, density=0.3, rescale="l1")
    l1 = np.abs(x.astype(np.float64)).sum()
    assert abs(np.abs(out.astype(np.float64)).sum() - l1) <= 1e-6 * l1
    assert np.array_equal(out != 0, np_topk_mask(x, 300))


def test_large_tensor_agrees_with_torch_topk():
    """A 4M-entry tensor (several radix buckets per binade): same kept set as torch.topk values."""
    x = torch.randn(2048, 2048) * 0.003
    k = topk.keep_count(0.2, x.numel())
    mask = topk.topk_mask(x, k)
    assert int(mask.sum()) == k
    a = x.abs().reshape(-1)
    kth = torch.topk(a, k).values.min()
    assert bool((a[mask.reshape(-1)] >= kth).all()) and bool((a[~mask.reshape(-1)] <= kth).all())


def test_not_elementwise_and_validation():
    assert not Magnitude(density=0.5).elementwise
    for bad in (0, -0.2, 1.01):
        doc = {"models": {"a": "x", "b": "y"}, "base": "a",
               "deltas": [{"model": "b", "edits": [{"magnitude": {"density": bad}}]}]}
        with pytest.raises(RecipeError, match=r"magnitude.density: density must satisfy 0 < density <= 1"):
            load_recipe(doc)


def test_apply_magnitude_end_to_end(family, tmp_path):
    doc = {
        "models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])},
        "base": "sft",
        "deltas": [{"model": "dpo", "edits": [{"magnitude": {"density": 0.25}}]}],
        "output": {"path": str(tmp_path / "out"), "dtype": "float32"},
    }
    res = weightx.apply(doc)
    sft, dpo, out = load_state_dict(family["sft"]), load_state_dict(family["dpo"]), load_state_dict(res.path)
    for name, o in out.items():
        base = sft[name].to(torch.float32).numpy()
        delta = dpo[name].to(torch.float32).numpy() - base
        mask = np_topk_mask(delta, np_keep_count(0.25, delta.size))
        assert np.array_equal(o.numpy(), np.where(mask, base + delta, base)), name
