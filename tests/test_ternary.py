"""Ternary (ComPEFT) edit: METHODS.md §4 / §8 golden values from float64 numpy, support and signs,
σ of the unpruned delta, the L2-optimal scale, zeros, and the encoded size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightx.edits.base import TensorContext
from weightx.edits.ternary import Ternary

TAU = np.array([0.1, -0.4, 0.05, 0.3, -0.2])


def ctx(shape):
    return TensorContext("model.layers.0.mlp.up_proj.weight", tuple(shape))


def run(edit, x):
    t = torch.tensor(x, dtype=torch.float32)
    return edit.apply(t.clone(), ctx(t.shape)).double().numpy()


def test_golden_compeft_example():
    sigma = np.std(TAU, ddof=1)
    assert sigma == pytest.approx(0.2729468813, abs=1e-10)
    out = run(Ternary(density=0.4), TAU)
    # exact-k keeps ⌊0.4·5⌋ = 2 entries (the reference's off-by-one would keep 3)
    assert np.allclose(out, [0, -sigma, 0, sigma, 0], rtol=1e-6, atol=0)


def test_values_support_and_signs():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 50, generator=gen) * 1e-3).numpy().astype(np.float64)
    alpha = 2.5
    out = run(Ternary(density=0.2, alpha=alpha), x)
    s = alpha * np.std(x.astype(np.float32).astype(np.float64), ddof=1)
    nz = out != 0
    assert nz.sum() == 400
    assert np.allclose(np.abs(out[nz]), s, rtol=1e-6)
    assert (np.sign(out[nz]) == np.sign(x[nz])).all()
    # the support is the 400 largest |x|
    assert np.abs(x[nz]).min() >= np.abs(x[~nz]).max()


def test_sigma_is_of_the_unpruned_delta():
    a = TAU.copy()
    b = TAU.copy()
    b[2] = 0.09  # a pruned entry changes, the kept ones do not
    oa, ob = run(Ternary(density=0.4), a), run(Ternary(density=0.4), b)
    assert (oa != 0).tolist() == (ob != 0).tolist()
    assert np.abs(ob).max() == pytest.approx(np.std(b, ddof=1), rel=1e-6)
    assert np.abs(oa).max() != pytest.approx(np.abs(ob).max(), rel=1e-4)


def test_mean_abs_kept_is_l2_optimal():
    out = run(Ternary(density=0.4, scale="mean_abs_kept"), TAU)
    assert np.allclose(out, [0, -0.35, 0, 0.35, 0], rtol=1e-6, atol=0)  # mean(|−0.4|, |0.3|)
    # For the chosen support and signs, ‖τ − s·sign‖² is smallest at s = mean|kept|.
    kept = np.array([-0.4, 0.3])
    grid = np.linspace(0, 1, 100001)
    errs = ((kept[None] - grid[:, None] * np.sign(kept)[None]) ** 2).sum(1)
    assert grid[errs.argmin()] == pytest.approx(0.35, abs=1e-5)
    # and it beats ComPEFT's σ on the same support
    sigma_out = run(Ternary(density=0.4), TAU)
    assert np.linalg.norm(TAU - out) < np.linalg.norm(TAU - sigma_out)


def test_zeros_are_never_kept():
    x = np.array([0.0, 0.5, 0.0, 0.0, -0.25, 0.0, 0.0, 0.0])
    out = run(Ternary(density=0.5), x)  # 4 slots, 2 non-zeros
    s = np.std(x, ddof=1)
    assert np.allclose(out, [0, s, 0, 0, -s, 0, 0, 0], rtol=1e-6, atol=0)
    z = Ternary(density=0.5).apply(torch.zeros(8), ctx((8,)))
    assert torch.equal(z, torch.zeros(8)) and not torch.signbit(z).any()


def test_ties_break_by_lowest_index():
    out = run(Ternary(density=0.4, scale="mean_abs_kept"), np.array([0.1, -0.1, 0.1, 0.1, 0.1]))
    assert (out != 0).tolist() == [True, True, False, False, False]


def test_encode_decode_round_trip_and_parts():
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(33, 70, generator=gen)
    e = Ternary(density=0.2)
    parts = e.encode(d, ctx(d.shape))
    specs = e.part_specs(tuple(d.shape))
    assert {k: tuple(v.shape) for k, v in parts.items() if not k.startswith("_")} == {k: s for k, (_, s) in specs.items()}
    approx = e.decode(parts, tuple(d.shape)).double()  # diagnostics: ⟨δ, δ̂⟩ and ‖δ̂‖² in closed form
    assert float(parts["_dot"]) == pytest.approx(float((approx * d.double()).sum()), rel=1e-6)
    assert float(parts["_sq"]) == pytest.approx(float((approx * approx).sum()), rel=1e-6)
    assert parts["packed"].dtype == parts["mask"].dtype == torch.uint8 and parts["scale"].dtype == torch.float32
    assert torch.equal(e.apply(d.clone(), ctx(d.shape)), e.decode(parts, tuple(d.shape)))
    assert e.codec_params(tuple(d.shape)) == {"codec": "ternary", "k": 462}


def test_size_below_one_fifteenth_of_bf16_at_density_0_2():
    for shape in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        specs = Ternary(density=0.2).part_specs(shape)
        nbytes = sum(np.prod(s) * (1 if dt == "U8" else 4) for dt, s in specs.values())
        assert nbytes <= np.prod(shape) * 2 / 15
        assert 8 * nbytes / np.prod(shape) == pytest.approx(1.05, abs=0.01)


# ---- scope: global (end to end: the statistics pass runs before writing) ----------------------------


def _global_recipe(fam, out, fmt="delta", **ternary):
    return {"models": {"sft": str(fam["sft"]), "dpo": str(fam["dpo"])}, "base": "sft",
            "deltas": [{"model": "dpo", "edits": [{"ternary": ternary}]}],
            "output": {"path": str(out), "format": fmt, "shard_size": "60KB"}}


def _decoded(path):
    from weightx.io.sources import resolve

    src = resolve("a", str(path))
    return {n: src.artifact.decode(n).double().numpy() for n in src.artifact.codecs}


@pytest.mark.parametrize("scale", ["std", "mean_abs_kept"])
def test_global_scope_matches_a_flattened_numpy_reference(family, tmp_path, scale):
    import json

    import weightx.api as api
    from weightx.pipeline.plan import natural_key
    from weightx.testing import load_state_dict

    density = 0.137
    api.apply(_global_recipe(family, tmp_path / "g", density=density, scope="global", scale=scale))
    got = _decoded(tmp_path / "g")
    base, ft = load_state_dict(family["sft"]), load_state_dict(family["dpo"])
    names = sorted(got, key=natural_key)
    deltas = [(ft[n].float() - base[n].float()).double().numpy().reshape(-1) for n in names]
    tau = np.concatenate(deltas)
    k = int(np.floor(density * tau.size))
    order = np.lexsort((np.arange(tau.size), -np.abs(tau)))  # largest |τ| first, ties: lowest index
    kept = np.zeros(tau.size, dtype=bool)
    kept[order[:k]] = True
    kept &= tau != 0
    s = np.std(tau, ddof=1) if scale == "std" else np.abs(tau[kept]).mean()
    want = np.where(kept, np.sign(tau) * s, 0.0)
    at = 0
    for n, d in zip(names, deltas):
        w = want[at:at + d.size].reshape(got[n].shape)
        at += d.size
        assert ((got[n] != 0) == (w != 0)).all(), n
        assert np.allclose(got[n], w, rtol=1e-6, atol=0), n
    meta = json.loads((tmp_path / "g" / "weightx.json").read_text())
    assert meta["ternary_global"]["kept"] == int(kept.sum()) and meta["ternary_global"]["parameters"] == tau.size
    assert sum(t["k"] for t in meta["delta"]["tensors"].values()) == int(kept.sum())
    # the exact cut fell inside a run of equal |τ| (bf16 deltas repeat values), so ties were split
    cut = np.abs(tau[order[k - 1]])
    assert (np.abs(tau) == cut).sum() > (np.abs(tau[order[:k]]) == cut).sum()


@pytest.mark.slow
def test_global_and_per_tensor_agree_on_one_tensor_and_differ_on_two(family, tmp_path):
    import weightx.api as api
    from weightx.testing import load_state_dict

    one = ["model.layers.0.self_attn.q_proj.weight"]
    api.apply(_global_recipe(family, tmp_path / "g1", scope="global", include=one))
    api.apply(_global_recipe(family, tmp_path / "t1", scope="tensor", include=one))
    a, b = load_state_dict(tmp_path / "g1"), load_state_dict(tmp_path / "t1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    two = one + ["model.layers.0.input_layernorm.weight"]  # norm deltas are ~50x the projection's
    api.apply(_global_recipe(family, tmp_path / "g2", scope="global", include=two))
    api.apply(_global_recipe(family, tmp_path / "t2", scope="tensor", include=two))
    g, t = _decoded(tmp_path / "g2"), _decoded(tmp_path / "t2")
    norm = "model.layers.0.input_layernorm.weight"
    # globally, the large norm deltas are all kept (but the exact zeros) before any projection entry
    assert (t[norm] != 0).sum() == int(0.2 * 64) < (g[norm] != 0).sum()
    assert (g[norm] != 0).sum() == (load_state_dict(family["dpo"])[norm] != load_state_dict(family["sft"])[norm]).sum()
    assert not np.array_equal(g[one[0]], t[one[0]])


@pytest.mark.slow
def test_global_scope_dense_output_equals_its_reconstruction(family, tmp_path):
    import weightx.api as api
    from weightx.testing import load_state_dict

    dense = api.apply(_global_recipe(family, tmp_path / "dense", fmt="dense", density=0.3, scope="global"))
    api.apply(_global_recipe(family, tmp_path / "art", density=0.3, scope="global"))
    rec = api.apply({"models": {"sft": str(family["sft"]), "art": str(tmp_path / "art")}, "base": "sft",
                     "deltas": [{"model": "art"}], "output": {"path": str(tmp_path / "rec")}})
    x, y = load_state_dict(dense.path), load_state_dict(rec.path)
    assert all(torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x)
