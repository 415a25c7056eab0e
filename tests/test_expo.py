"""ExPO golden values against an independent float64 numpy computation of θ_dpo + α(θ_dpo − θ_sft)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightx
from weightx.testing import load_state_dict
from conftest import expo_recipe


def f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def bf16_ulp(x: np.ndarray) -> np.ndarray:
    """Spacing of bfloat16 numbers around x (8 significant bits)."""
    mag = np.maximum(np.abs(x), np.finfo(np.float32).tiny)
    return np.exp2(np.floor(np.log2(mag)) - 7)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 2.5, -0.4])
def test_expo_rounds_once_to_bf16(family, tmp_path, alpha):
    res = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", alpha, dtype="bfloat16"))
    assert len(res.shards) >= 1
    sft, dpo = load_state_dict(family["sft"]), load_state_dict(family["dpo"])
    out = load_state_dict(res.path)
    assert set(out) == set(dpo)
    for name, o in out.items():
        assert o.dtype == torch.bfloat16
        exact = f64(dpo[name]) + alpha * (f64(dpo[name]) - f64(sft[name]))
        err = np.abs(f64(o) - exact)
        # Round once: within half a bf16 ulp of the exact value, plus the float32 intermediates'
        # own error (a few fp32 ulps of the operands), which only shows where the result cancels to ~0.
        fp32_slack = 4 * 2.0**-24 * (np.abs(f64(dpo[name])) + abs(alpha) * np.abs(f64(dpo[name]) - f64(sft[name])))
        assert np.all(err <= 0.5 * bf16_ulp(exact) + fp32_slack), name



def test_expo_multi_shard_input_and_output(family, tmp_path):
    assert len(list(family["dpo"].glob("model*.safetensors"))) >= 2
    res = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3, shard_size="100KB"))
    assert len(res.shards) >= 2


def test_alpha_zero_is_dpo_and_minus_one_is_sft(family, tmp_path):
    sft, dpo = load_state_dict(family["sft"]), load_state_dict(family["dpo"])
    out0 = load_state_dict(weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "a0", 0.0)).path)
    out1 = load_state_dict(weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "a1", -1.0)).path)
    for name in dpo:
        assert torch.equal(out0[name].view(torch.int16), dpo[name].view(torch.int16)), name
        assert torch.equal(out1[name].view(torch.int16), sft[name].view(torch.int16)), name


def test_expo_golden_vector(tmp_path):
    """METHODS.md §8 ExPO 1: θ0 = [1, 2, −1], θ1 = [1.5, 1, −1] in fp32."""
    from safetensors.torch import save_file

    for name, vals in (("sft", [1.0, 2.0, -1.0]), ("dpo", [1.5, 1.0, -1.0])):
        save_file({"w": torch.tensor(vals, dtype=torch.float32)}, str(tmp_path / f"{name}.safetensors"))
    expected = {0.0: [1.5, 1.0, -1.0], 0.3: [1.65, 0.7, -1.0], 0.5: [1.75, 0.5, -1.0], -1.0: [1.0, 2.0, -1.0]}
    for alpha, want in expected.items():
        out = tmp_path / f"out{alpha}"
        weightx.apply(expo_recipe(tmp_path / "sft.safetensors", tmp_path / "dpo.safetensors", out, alpha))
        got = load_state_dict(out)["w"]
        exact = np.array([1.5, 1.0, -1.0]) + alpha * (np.array([1.5, 1.0, -1.0]) - np.array([1.0, 2.0, -1.0]))
        np.testing.assert_allclose(got.numpy(), exact, rtol=0, atol=1e-6)
        np.testing.assert_allclose(exact, want, atol=1e-12)
    # α = −1 returns θ0 exactly in fp32
    assert load_state_dict(tmp_path / "out-1.0")["w"].tolist() == [1.0, 2.0, -1.0]


def test_expo_equals_task_arithmetic_with_weight(family, tmp_path):
    """ExPO(α) == sum combine with the delta weighted 1+α (METHODS.md §8 ExPO 6), to fp32 rounding."""
    a = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "expo", 0.3, dtype="float32"))
    doc = expo_recipe(family["sft"], family["dpo"], tmp_path / "ta", 0.3, dtype="float32")
    doc["deltas"] = [{"model": "dpo", "weight": 1.3}]
    b = weightx.apply(doc)
    sa, sb = load_state_dict(a.path), load_state_dict(b.path)
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-6, atol=1e-7)
