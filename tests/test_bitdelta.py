"""BitDelta edit: METHODS.md §3 / §8 golden values from float64 numpy, sign of zero, residual bits,
per-row scales, the size bound, and default tensor selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightx.edits.base import TensorContext
from weightx.edits.bitdelta import BitDelta, binarize, debinarize
from weightx.recipe.model import load_recipe

DELTA = np.array([[0.02, -0.01, 0.0, 0.03], [-0.04, 0.01, 0.02, -0.02]])


def ctx(shape, name="model.layers.0.self_attn.q_proj.weight"):
    return TensorContext(name, tuple(shape))


def _residual_reference(delta: np.ndarray, bits: int, axis=None) -> np.ndarray:
    """float64 numpy residual binarisation (METHODS §5.3 (i)), sign(0) = +1."""
    r = delta.astype(np.float64)
    out = np.zeros_like(r)
    for _ in range(bits):
        s = np.where(r >= 0, 1.0, -1.0)
        a = np.abs(r).mean(axis=axis, keepdims=axis is not None)
        out += a * s
        r = r - a * s
    return out


def test_golden_l2_optimal_scale_0_01875():
    alpha0 = np.abs(DELTA).mean()
    assert alpha0 == pytest.approx(0.01875, abs=1e-15)
    # A grid search of ‖Δ − αS‖² over α finds the same minimiser, with error Σ(|Δ| − α)² = 0.0010875.
    s = np.where(DELTA >= 0, 1.0, -1.0)
    grid = np.linspace(0.0, 0.05, 50001)
    errs = ((DELTA[None] - grid[:, None, None] * s[None]) ** 2).sum(axis=(1, 2))
    assert grid[errs.argmin()] == pytest.approx(0.01875, abs=1e-6)
    assert errs.min() == pytest.approx(0.0010875, abs=1e-12)

    packed, scale = binarize(torch.tensor(DELTA, dtype=torch.float32))
    assert scale.dtype == torch.float32 and scale.shape == (1,)
    assert float(scale[0]) == pytest.approx(0.01875, rel=1e-7)
    out = BitDelta().apply(torch.tensor(DELTA, dtype=torch.float32), ctx(DELTA.shape))
    err = float(((out.double() - torch.tensor(DELTA)) ** 2).sum())
    assert err == pytest.approx(0.0010875, rel=1e-6)


def test_sign_of_zero_is_plus_one():
    """Reference-code convention: Δ = 0 -> +1. Reconstruction [[+,−,+,+],[−,+,+,−]]·0.01875."""
    out = BitDelta().apply(torch.tensor(DELTA, dtype=torch.float32), ctx(DELTA.shape))
    expected = np.array([[1, -1, 1, 1], [-1, 1, 1, -1]]) * np.float32(0.01875)
    assert np.allclose(out.numpy(), expected, rtol=1e-7, atol=0)
    assert float(out[0, 2]) > 0  # the zero
    # An all-zero delta: every sign is +, the scale is 0, so the output is +0.0 (no −0.0).
    z = BitDelta().apply(torch.zeros(3, 16), ctx((3, 16)))
    assert torch.equal(z, torch.zeros(3, 16)) and not torch.signbit(z).any()


def test_apply_is_decode_of_encode_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(24, 40, generator=gen) * 1e-3
    for edit in (BitDelta(), BitDelta(bits=3), BitDelta(group="row", bits=2, scale_multiplier=1.3)):
        parts = edit.encode(d, ctx(d.shape))
        specs = edit.part_specs(tuple(d.shape))
        assert {k: (v.dtype, tuple(v.shape)) for k, v in parts.items() if not k.startswith("_")} == {
            k: ({"U8": torch.uint8, "F32": torch.float32}[dt], shp) for k, (dt, shp) in specs.items()
        }
        applied = edit.apply(d.clone(), ctx(d.shape))
        assert torch.equal(applied, edit.decode(parts, tuple(d.shape)))
        assert applied.dtype == torch.float32 and applied.shape == d.shape


def test_residual_bits_error_non_increasing_and_b1_is_bitdelta():
    gen = torch.Generator().manual_seed(1)
    d = (torch.randn(32, 64, generator=gen) * torch.rand(32, 1, generator=gen)).double().numpy()
    d32 = torch.tensor(d, dtype=torch.float32)
    errors = []
    for b in range(1, 7):
        out = BitDelta(bits=b).apply(d32.clone(), ctx(d.shape)).double().numpy()
        ref = _residual_reference(d32.double().numpy(), b)
        assert np.allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())  # float32 vs float64 sums of ±α_j
        errors.append(np.linalg.norm(d32.double().numpy() - out))
    assert all(e2 <= e1 * (1 + 1e-6) for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 0.5 * errors[0]
    plain = np.abs(d32.double().numpy()).mean() * np.where(d32.numpy() >= 0, 1.0, -1.0)
    assert np.allclose(BitDelta(bits=1).apply(d32.clone(), ctx(d.shape)).double().numpy(), plain, rtol=1e-6)


def test_row_group_scales_are_per_output_row():
    gen = torch.Generator().manual_seed(2)
    d = torch.randn(6, 20, generator=gen) * torch.tensor([1e-3, 1e-2, 1e-4, 5e-3, 2e-3, 1e-3]).unsqueeze(1)
    packed, scale = binarize(d, group="row")
    assert scale.shape == (1, 6)
    assert np.allclose(scale[0].numpy(), np.abs(d.double().numpy()).mean(axis=1), rtol=1e-6)
    out = BitDelta(group="row", bits=2).apply(d.clone(), ctx(d.shape)).double().numpy()
    assert np.allclose(out, _residual_reference(d.double().numpy(), 2, axis=1), rtol=1e-5, atol=1e-12)
    # Per-row scales fit a delta whose rows differ in size better than one scale per matrix.
    e_row = np.linalg.norm(d.numpy() - BitDelta(group="row").apply(d.clone(), ctx(d.shape)).numpy())
    e_tensor = np.linalg.norm(d.numpy() - BitDelta().apply(d.clone(), ctx(d.shape)).numpy())
    assert e_row < e_tensor


def test_scale_multiplier():
    d = torch.tensor(DELTA, dtype=torch.float32)
    out = BitDelta(scale_multiplier=1.5).apply(d.clone(), ctx(d.shape))
    assert float(out.abs().max()) == pytest.approx(1.5 * 0.01875, rel=1e-6)
    assert torch.equal(torch.sign(out), torch.where(d >= 0, 1.0, -1.0))


def test_debinarize_validates_nothing_it_cannot_and_round_trips_odd_widths():
    d = torch.randn(5, 13, generator=torch.Generator().manual_seed(3))
    packed, scale = binarize(d, bits=2)
    assert packed.shape == (2, 5, 2)
    assert torch.equal(debinarize(packed, scale, (5, 13)), BitDelta(bits=2).apply(d.clone(), ctx(d.shape)))


def test_forward_equivalence():
    """METHODS §8 BitDelta 4: x@W_baseᵀ + α·x@Sᵀ == x@(W_base + αS)ᵀ (fp32, 1e-5)."""
    gen = torch.Generator().manual_seed(4)
    w, d, x = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen) * 1e-2, torch.randn(3, 32, generator=gen)
    packed, scale = binarize(d)
    s = debinarize(packed, torch.ones(1), (16, 32))
    lhs = x @ w.T + scale[0] * (x @ s.T)
    rhs = x @ (w + debinarize(packed, scale, (16, 32))).T
    assert torch.allclose(lhs, rhs, atol=1e-5, rtol=0)


def test_size_at_most_one_fifteenth_of_bf16_delta():
    for shape in [(4096, 4096), (11008, 4096), (4096, 11008), (64, 64)]:
        specs = BitDelta().part_specs(shape)
        nbytes = sum(np.prod(s) * (1 if dt == "U8" else 4) for dt, s in specs.values())
        assert nbytes <= np.prod(shape) * 2 / 15


LLAMA_NAMES = {
    "model.embed_tokens.weight": (512, 64),
    "model.layers.0.input_layernorm.weight": (64,),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.self_attn.k_proj.weight": (32, 64),
    "model.layers.0.self_attn.v_proj.weight": (32, 64),
    "model.layers.0.self_attn.o_proj.weight": (64, 64),
    "model.layers.0.self_attn.q_proj.bias": (64,),
    "model.layers.0.post_attention_layernorm.weight": (64,),
    "model.layers.0.mlp.gate_proj.weight": (128, 64),
    "model.layers.0.mlp.up_proj.weight": (128, 64),
    "model.layers.0.mlp.down_proj.weight": (64, 128),
    "model.norm.weight": (64,),
    "lm_head.weight": (512, 64),
}


def test_default_selection_is_the_seven_projections():
    chosen = {n for n, s in LLAMA_NAMES.items() if BitDelta().applies_to(n, s)}
    assert chosen == {f"model.layers.0.{m}.{p}_proj.weight" for m, ps in
                      (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in ps}
    # include/exclude override the default
    e = BitDelta(include=["*embed_tokens*", "*q_proj*"], exclude=["*.bias"])
    assert {n for n, s in LLAMA_NAMES.items() if e.applies_to(n, s)} == {
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}


def test_recipe_form_and_validation():
    r = load_recipe({
        "models": {"a": "x", "b": "y"}, "base": "a",
        "deltas": [{"model": "b", "edits": [{"bitdelta": {"bits": 2, "group": "row",
                                                          "distill": {"data": "c.txt", "steps": 5}}}]}],
    })
    e = r.deltas[0].edits[0]
    assert e.bits == 2 and e.distill.steps == 5 and e.distill.batch_size == 4 and e.distill.lr == 1e-4
    assert e.distill.max_length == 128
    from weightx.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        load_recipe({"models": {"a": "x", "b": "y"}, "base": "a",
                     "deltas": [{"model": "b", "edits": [{"bitdelta": {"bits": 0, "group": "col", "distill": {"stps": 1}}}]}]})
    text = str(err.value)
    assert "bits" in text and "group" in text and "stps" in text and "data" in text


@pytest.mark.parametrize("edit", [BitDelta(), BitDelta(group="row", scale_multiplier=0.7)])
def test_closed_form_diagnostics_match_the_decoded_delta(edit):
    d = torch.randn(12, 40, generator=torch.Generator().manual_seed(5)).double() * 1e-3
    parts = edit.encode(d.float(), ctx(d.shape))
    approx = edit.decode(parts, tuple(d.shape)).double()
    assert float(parts["_dot"]) == pytest.approx(float((approx * d.float().double()).sum()), rel=1e-6)
    assert float(parts["_sq"]) == pytest.approx(float((approx * approx).sum()), rel=1e-6)
