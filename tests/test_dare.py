"""DARE: METHODS.md §8 golden checks against float64 numpy, statistics with explicit bounds, the
counter-based mask (spec, block independence, independence across names), recipe validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import weightx
from weightx.kernels import rng
from weightx.edits import EDITS, TensorContext
from weightx.edits.dare import dare_
from weightx.errors import RecipeError
from weightx.recipe.model import load_recipe
from weightx.testing import load_state_dict
from conftest import run_cli, write_recipe
from sparsify_helpers import np_dare, np_drop_mask, np_hash, seed_key

Dare = EDITS["dare"]


def run_dare(delta: np.ndarray, name: str = "w", **kw) -> np.ndarray:
    d = torch.tensor(delta, dtype=torch.float32)
    kw.setdefault("seed", 0)  # the numpy references below key by seed 0; the default is tested apart
    return Dare(**kw).apply(d, TensorContext(name, tuple(d.shape))).numpy()


def rel_close(a: np.ndarray, b: np.ndarray, tol: float = 1e-6) -> bool:
    return bool(np.all(np.abs(a - b) <= tol * np.maximum(np.abs(b), 1e-30)))


# ----------------------------------------------------------------------------- the mask itself


@pytest.fixture(params=["numpy", "torch"])
def words(request, monkeypatch):
    """On CPU the hash rounds run in numpy; torch's int32 path is the one CUDA uses: both tested."""
    monkeypatch.setattr(rng, "NUMPY_ON_CPU", request.param == "numpy")
    return request.param


def test_hash_matches_the_documented_spec(words):
    """The int32 bit-pattern arithmetic (torch) and the CPU's uint32 numpy rounds equal a plain
    uint32 reference, hence any device's: across the int32 sign boundary (2³¹) and up to 2³²."""
    for key in (0, 1, seed_key(0, "model.layers.0.mlp.up_proj.weight"), (1 << 63) - 1):
        for start, count in ((0, 5000), (123_456_789, 3000), ((1 << 31) - 1500, 3000), ((1 << 32) - 2000, 2000)):
            got = rng.hash_range(key, start, count).numpy()
            assert np.array_equal(got, np_hash(key, start, count).astype(np.int64))


def test_indices_past_2_32_get_fresh_values(words):
    key = seed_key(0, "huge")
    below = rng.hash_range(key, (1 << 32) - 4, 4)
    across = rng.hash_range(key, (1 << 32) - 4, 8)  # a piece on each side of the boundary
    assert torch.equal(across[:4], below)
    assert not torch.equal(across[4:], rng.hash_range(key, 0, 4))  # the high word is hashed in
    assert torch.equal(across[4:], rng.hash_range(key, 1 << 32, 4))


def test_mask_is_the_spec_and_u_is_24_bit():
    m = rng.drop_mask(seed_key(7, "a.weight"), 0, 100_000, 0.37)
    assert np.array_equal(m.numpy(), np_drop_mask(7, "a.weight", 100_000, 0.37))
    u = rng.uniform(seed_key(7, "a.weight"), 0, 100_000).numpy()
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert np.array_equal(u * 2.0**24, np.floor(u * 2.0**24))  # exactly on the 2^-24 grid
    assert np.array_equal(u < 0.37, m.numpy())


@pytest.mark.parametrize("p", [0.0, 1e-7, 0.5, 0.9, 1.0 - 2.0**-24, 1.0])
def test_mask_edges_of_p_and_of_the_signed_range(p, words):
    """Unsigned h < T done as a signed compare: p = 0 drops nothing, p = 1 everything, and hashes
    on either side of 2³¹ compare as unsigned words (numpy reference)."""
    for start in (0, (1 << 31) - 2500):
        m = rng.drop_mask(seed_key(5, "b.weight"), start, 5000, p).numpy()
        assert np.array_equal(m, np_drop_mask(5, "b.weight", 5000, p, start=start)), (p, start)
        # The AND-words DARE uses: 0 exactly where dropped, all ones where kept.
        words = torch.cat([w.clone() for _, w in rng.keep_words(seed_key(5, "b.weight"), start, 5000, p, torch.device("cpu"))])
        assert set(words.unique().tolist()) <= {0, -1} and np.array_equal((words == 0).numpy(), m), (p, start)
    if p in (0.0, 1.0):
        assert m.all() == (p == 1.0) and m.any() == (p == 1.0)


def test_blocks_give_the_same_mask_as_the_whole_tensor(words):
    """What the engine relies on: DARE on a block at `offset` equals that slice of the whole."""
    n = 3 * rng.CHUNK + 12345  # several internal chunks, ragged end
    delta = torch.randn(n)
    whole = dare_(delta.clone(), drop=0.6, key=99, offset=0)
    for block in (1000, 65_536, rng.CHUNK + 7):
        parts = [dare_(delta[s : s + block].clone(), drop=0.6, key=99, offset=s) for s in range(0, n, block)]
        assert torch.equal(torch.cat(parts), whole), block


def test_same_seed_and_name_same_mask_different_names_independent():
    n, p = 200_000, 0.5
    a = np_drop_mask(0, "model.layers.0.self_attn.q_proj.weight", n, p)
    assert np.array_equal(a, rng.drop_mask(seed_key(0, "model.layers.0.self_attn.q_proj.weight"), 0, n, p).numpy())
    others = [
        np_drop_mask(0, "model.layers.0.self_attn.k_proj.weight", n, p),  # another name
        np_drop_mask(1, "model.layers.0.self_attn.q_proj.weight", n, p),  # another seed
    ]
    for b in others:
        # Pearson correlation of two independent Bernoulli masks ~ N(0, 1/n): |r| < 5/sqrt(n).
        r = np.corrcoef(a, b)[0, 1]
        assert abs(r) < 5 / math.sqrt(n), r
    # Within one mask, neighbours are uncorrelated too (lag-1 and a power-of-two lag).
    for lag in (1, 256):
        r = np.corrcoef(a[:-lag], a[lag:])[0, 1]
        assert abs(r) < 5 / math.sqrt(n), (lag, r)


def test_uniforms_are_uniform():
    u = rng.uniform(seed_key(3, "x"), 0, 1_000_000).numpy().astype(np.float64)
    counts = np.bincount((u * 64).astype(int), minlength=64)
    chi2 = float(((counts - 1_000_000 / 64) ** 2 / (1_000_000 / 64)).sum())
    # chi-square with 63 dof: mean 63, sd ~11.2; P(chi2 > 150) < 1e-8.
    assert chi2 < 150, chi2


# ----------------------------------------------------------------------------- METHODS.md §8 DARE


def test_p_zero_is_identity_bit_for_bit():
    delta = np.random.default_rng(0).normal(size=(37, 11)).astype(np.float32)
    assert np.array_equal(run_dare(delta, drop=0.0), delta)
    assert np.array_equal(run_dare(delta, drop=0.0, k=0.5), delta)


def test_p_one_gives_zeros_not_nan():
    """The pure function handles p = 1 as MergeLM does (zeros); recipes reject it (below)."""
    out = dare_(torch.randn(1000), drop=1.0, key=5)
    assert torch.equal(out, torch.zeros(1000))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_support_and_golden_against_numpy(p):
    rs = np.random.default_rng(1)
    delta = rs.normal(scale=0.01, size=(64, 129)).astype(np.float32)
    out = run_dare(delta, "layer.w", drop=p, seed=11)
    mask = np_drop_mask(11, "layer.w", delta.size, p).reshape(delta.shape)
    expected = np_dare(delta, mask, p)  # float64 Δ/(1−p) on survivors, 0 on dropped
    assert np.all(out[mask] == 0)
    assert rel_close(out[~mask], expected[~mask])
    # Support: each entry is 0 or Δ/(1−p).
    assert np.all((out == 0) | np.isclose(out, delta / (1 - p), rtol=1e-6, atol=0))


def test_unbiased_mean_and_variance_at_p_09():
    """METHODS.md §8 DARE 3: Δ = [0.01, −0.02, 0.005, 0], N = 4e5 draws, p = 0.9.

    Each of the N copies of Δ is an independent draw (distinct flat indices of one tensor)."""
    p, N = 0.9, 400_000
    delta = np.array([0.01, -0.02, 0.005, 0.0])
    draws = run_dare(np.tile(delta, N).astype(np.float32), "unbiased", drop=p, seed=0).reshape(N, 4).astype(np.float64)
    mean, var = draws.mean(0), draws.var(0)
    assert np.all(np.abs(mean - delta) <= 5 * np.abs(delta) * math.sqrt(p / ((1 - p) * N)))
    # Var = Δ²p/(1−p) = [9e-4, 3.6e-3, 2.25e-4, 0]; the sample variance's sd is sqrt((μ4 − σ⁴)/N)
    # for this two-point distribution (0 w.p. p, Δ/(1−p) w.p. 1−p).
    target = delta**2 * p / (1 - p)
    assert np.allclose(target, [9e-4, 3.6e-3, 2.25e-4, 0])
    b = delta / (1 - p)
    mu4 = p * delta**4 + (1 - p) * (b - delta) ** 4
    assert np.all(np.abs(var - target) <= 5 * np.sqrt((mu4 - target**2) / N) + 1e-12)


def test_unbiased_over_many_seeds():
    """The mean over seeds (fresh keys, not just fresh indices) also converges to Δ."""
    p, seeds = 0.8, 2000
    delta = np.linspace(-0.03, 0.03, 50).astype(np.float32)
    acc = np.zeros(50)
    for s in range(seeds):
        acc += run_dare(delta, "w", drop=p, seed=s)
    mean = acc / seeds
    assert np.all(np.abs(mean - delta) <= 5 * np.abs(delta) * math.sqrt(p / ((1 - p) * seeds)) + 1e-9)


@pytest.mark.parametrize("p,n", [(0.9, 1_000_000), (0.5, 100_000), (0.01, 300_000)])
def test_kept_count_is_binomial(p, n):
    """METHODS.md §8 DARE 4: kept ~ Binomial(n, 1−p); two-sided test at 1e-6 (|z| < 4.89)."""
    kept = int(np.count_nonzero(run_dare(np.ones(n, np.float32), "count", drop=p, seed=4)))
    z = (kept - n * (1 - p)) / math.sqrt(n * p * (1 - p))
    assert abs(z) < 4.89, z


def test_kept_counts_across_names_have_binomial_spread():
    """200 tensors of 1000: counts' mean and variance match Binomial(1000, 0.7) (5σ bounds)."""
    p, n, m = 0.3, 1000, 200
    counts = np.array([np.count_nonzero(~np_drop_mask(0, f"t{i}", n, p)) for i in range(m)], dtype=np.float64)
    torch_counts = np.array(
        [np.count_nonzero(run_dare(np.ones(n, np.float32), f"t{i}", drop=p)) for i in range(m)], dtype=np.float64
    )
    assert np.array_equal(counts, torch_counts)
    mu, var = n * (1 - p), n * p * (1 - p)
    assert abs(counts.mean() - mu) <= 5 * math.sqrt(var / m)
    # sample variance of m normal-ish draws: sd ≈ var·sqrt(2/(m−1))
    assert abs(counts.var(ddof=1) - var) <= 5 * var * math.sqrt(2 / (m - 1))


def test_l1_rescale_keeps_the_l1_norm():
    """METHODS.md §8 DARE 7 (mergekit semantics): ‖out‖₁ == ‖Δ‖₁ to 1e-6 relative."""
    rs = np.random.default_rng(2)
    delta = rs.normal(scale=0.02, size=(300, 70)).astype(np.float32)
    out = run_dare(delta, "l1", drop=0.7, rescale="l1", seed=1)
    l1 = np.abs(delta.astype(np.float64)).sum()
    assert abs(np.abs(out.astype(np.float64)).sum() - l1) <= 1e-6 * l1
    mask = np_drop_mask(1, "l1", delta.size, 0.7).reshape(delta.shape)
    assert np.all(out[mask] == 0)
    assert rel_close(out, np_dare(delta, mask, 0.7, rescale="l1"), 2e-6)
    assert not Dare(drop=0.7, rescale="l1").elementwise
    assert Dare(drop=0.7).elementwise and Dare(drop=0.7, rescale="none").elementwise


def test_l1_skips_empty_tensors():
    out = run_dare(np.zeros(100, np.float32), "z", drop=0.5, rescale="l1")
    assert np.array_equal(out, np.zeros(100))


def test_rescale_none_is_plain_dropping():
    delta = np.random.default_rng(3).normal(size=5000).astype(np.float32)
    out = run_dare(delta, "n", drop=0.4, rescale="none", seed=2)
    mask = np_drop_mask(2, "n", delta.size, 0.4)
    assert np.array_equal(out, np.where(mask, 0, delta).astype(np.float32))


@pytest.mark.parametrize("k", [0.5, 0.9, 1.5, 2.0])
def test_generalised_k_support_and_mean_factor(k):
    """METHODS.md §8 DARE 8 / §5.2: selected × k, others × (1 − kp)/(1 − p); E[factor] = 1."""
    p, n = 0.3, 400_000
    delta = np.full(n, 0.01, np.float32)
    out = run_dare(delta, "gk", drop=p, k=k, seed=5)
    mask = np_drop_mask(5, "gk", n, p)
    expected = np_dare(delta, mask, p, k=k)
    assert rel_close(out, expected)
    factor = out.astype(np.float64) / 0.01
    keep = (1 - k * p) / (1 - p)
    sd = abs(k - keep) * math.sqrt(p * (1 - p) / n)  # factor is two-point: k w.p. p, keep w.p. 1−p
    assert abs(factor.mean() - 1.0) <= 5 * sd


def test_generalised_k0_is_dare_and_k1_is_identity():
    delta = np.random.default_rng(4).normal(size=(50, 40)).astype(np.float32)
    assert np.array_equal(run_dare(delta, "w", drop=0.6, k=0.0), run_dare(delta, "w", drop=0.6))
    # k = 0 through the general (k ≠ 0) code path: same bits as the plain DARE path
    d = torch.tensor(delta)
    a = dare_(d.clone(), drop=0.6, key=1, k=0.0)
    b = dare_(d.clone(), drop=0.6, key=1, k=1e-300)  # selected × (1e-300 → 0 in fp32), survivors × 2.5
    assert torch.equal(a, b)  # (−0.0 == 0.0)
    assert np.array_equal(run_dare(delta, "w", drop=0.6, k=1.0), delta)


# ----------------------------------------------------------------------------- recipes and the engine


@pytest.mark.parametrize("drop", [1.0, 1.5, -0.1])
def test_recipe_rejects_drop_outside_0_1(drop):
    doc = {"models": {"a": "x", "b": "y"}, "base": "a", "deltas": [{"model": "b", "edits": [{"dare": {"drop": drop}}]}]}
    with pytest.raises(RecipeError) as e:
        load_recipe(doc)
    msg = str(e.value)
    assert "deltas.0.edits.0.dare.drop" in msg and "0 <= drop < 1" in msg


@pytest.mark.slow
def test_cli_bad_drop_is_one_line_exit_2(tmp_path):
    doc = {"models": {"a": "x", "b": "y"}, "base": "a", "output": {"path": str(tmp_path / "o")},
           "deltas": [{"model": "b", "edits": [{"dare": {"drop": 1}}]}]}
    r = run_cli("plan", str(write_recipe(tmp_path / "r.yaml", doc)))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "0 <= drop < 1" in r.stderr


def test_apply_dare_end_to_end_matches_numpy(family, tmp_path):
    """Recipe → engine → files: every tensor equals base + DARE(θ − base) computed in numpy."""
    doc = {
        "models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])},
        "base": "sft",
        "deltas": [{"model": "dpo", "edits": [{"dare": {"drop": 0.7, "seed": 3}}]}],
        "output": {"path": str(tmp_path / "out"), "dtype": "float32"},
    }
    res = weightx.apply(doc)
    sft, dpo, out = load_state_dict(family["sft"]), load_state_dict(family["dpo"]), load_state_dict(res.path)
    for name, o in out.items():
        base = sft[name].to(torch.float32).numpy()
        delta = dpo[name].to(torch.float32).numpy() - base  # exact: bf16 inputs, fp32 difference
        mask = np_drop_mask(3, name, delta.size, 0.7).reshape(delta.shape)
        expected = base.astype(np.float64) + np_dare(delta, mask, 0.7)
        assert np.allclose(o.numpy(), expected, rtol=1e-6, atol=1e-7), name
        assert np.array_equal(o.numpy()[mask], base[mask]), name


def test_dare_expo_recipe_runs_and_is_dare_then_expo(family, tmp_path):
    """recipes/dare-expo.yaml on local stand-ins: θ = θ_sft + (1 + α)·DARE(θ_dpo − θ_sft)."""
    from conftest import REPO

    r = load_recipe(REPO / "recipes" / "dare-expo.yaml", [
        f"models.sft={family['sft']}", f"models.dpo={family['dpo']}", "output.dtype=float32",
    ])
    assert [e.op for e in r.deltas[0].edits] == ["dare", "expo"]
    dare, expo = r.deltas[0].edits
    assert (dare.drop, dare.rescale, expo.alpha) == (0.9, "inverse_keep", 0.1)
    out = load_state_dict(weightx.apply(r, output=tmp_path / "out").path)
    sft, dpo = load_state_dict(family["sft"]), load_state_dict(family["dpo"])
    for name, o in out.items():
        base = sft[name].to(torch.float32).numpy()
        delta = dpo[name].to(torch.float32).numpy() - base
        mask = np_drop_mask(dare.seed, name, delta.size, 0.9).reshape(delta.shape)
        expected = base.astype(np.float64) + 1.1 * np_dare(delta, mask, 0.9)
        assert np.allclose(o.numpy(), expected, rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("seeds", [(None, None), (7, 7)], ids=["default: independent", "shared explicit seed"])
def test_masks_are_independent_per_delta_by_default_and_shared_on_request(merge_family, tmp_path, seeds):
    """Two deltas with DARE and no seed get independent masks keyed by their aliases (P(kept in
    code | kept in math) ≈ 1 − p, not 1); the same explicit seed on both gives them one mask.
    Every tensor also equals base + Σ DARE(δ_i) computed in numpy from the documented keys."""
    p = 0.5
    doc = {
        "models": {k: str(merge_family[k]) for k in ("base", "math", "code")},
        "base": "base",
        "deltas": [{"model": m, "edits": [{"dare": {"drop": p} | ({"seed": s} if s is not None else {})}]}
                   for m, s in zip(("math", "code"), seeds)],
        "output": {"path": str(tmp_path / "out"), "dtype": "float32"},
    }
    out = load_state_dict(weightx.apply(doc).path)
    sd = {k: load_state_dict(merge_family[k]) for k in ("base", "math", "code")}
    both = first = 0
    for name, o in out.items():
        base = sd["base"][name].to(torch.float32).numpy()
        expected = base.astype(np.float64)
        masks = []
        for alias, seed in zip(("math", "code"), seeds):
            delta = sd[alias][name].to(torch.float32).numpy() - base
            mask = np_drop_mask(seed, name, delta.size, p, delta=alias).reshape(delta.shape)
            masks.append(mask)
            expected = expected + np_dare(delta, mask, p)
        assert np.allclose(o.numpy(), expected, rtol=1e-6, atol=1e-6), name
        first += int((~masks[0]).sum())
        both += int((~masks[0] & ~masks[1]).sum())
    if seeds[0] is None:
        sigma = math.sqrt(p * (1 - p) / first)
        assert first > 10_000 and abs(both / first - (1 - p)) < 5 * sigma
    else:
        assert both == first  # one mask
