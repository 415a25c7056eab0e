"""Issue 16 item 6, outputs always load: a config-less fine-tune as config_from, tensors only a fine-tune
has, mixed input dtypes: each refused or said at plan time in one line naming the option to set."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import weightx
from weightx.api import describe_plan
from weightx.errors import PlanError
from weightx.testing import load_state_dict, make_tiny_llama
from conftest import run_cli, write_recipe


def recipe(sft, dpo, out, **output) -> dict:
    return {"models": {"sft": str(sft), "dpo": str(dpo)}, "base": "sft",
            "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": 0.3}}]}], "output": {"path": str(out), **output}}


def test_bare_file_fine_tune_needs_a_config_source(family, tmp_path):
    bare = tmp_path / "dpo.safetensors"
    save_file(load_state_dict(family["dpo"]), str(bare), metadata={"format": "pt"})
    proc = run_cli("apply", str(write_recipe(tmp_path / "r.yaml", recipe(family["sft"], bare, tmp_path / "out"))))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "has no config.json (by default it is the last delta's model), so the output would not load" in proc.stderr
    assert "set output.config_from: sft" in proc.stderr and not (tmp_path / "out").exists()
    out = weightx.apply(recipe(family["sft"], bare, tmp_path / "ok", config_from="sft")).path
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_tensors_only_a_fine_tune_has_are_never_dropped_silently(family, tmp_path):
    """A reward/value-head fine-tune: its extra tensors are refused unless dropped knowingly."""
    tuned = tmp_path / "dpo-vhead"
    tuned.mkdir()
    state = load_state_dict(family["dpo"])
    state["v_head.summary.weight"] = torch.randn(1, 64).to(torch.bfloat16)
    state["v_head.summary.bias"] = torch.zeros(1).to(torch.bfloat16)
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    (tuned / "config.json").write_text((family["dpo"] / "config.json").read_text())
    with pytest.raises(PlanError) as e:
        weightx.plan(recipe(family["sft"], tuned, tmp_path / "o", config_from="sft"))
    msg = str(e.value)
    assert "'dpo' has 2 tensor(s) that 'sft' (output.config_from) lacks, e.g. v_head.summary.bias" in msg
    assert "output.drop: ['v_head.summary.*']" in msg and len(e.value.problems) == 1
    out = weightx.apply(recipe(family["sft"], tuned, tmp_path / "o", config_from="sft", drop=["v_head.summary.*"])).path
    written = load_state_dict(out)
    assert not any(k.startswith("v_head") for k in written) and "lm_head.weight" in written
    # drop also leaves out the config model's own tensors when asked (the user's choice, recorded)
    rec = json.loads((out / "weightx.json").read_text())
    assert rec["recipe"]["output"]["drop"] == ["v_head.summary.*"]


def test_mixed_input_dtypes_say_which_dtype_the_output_takes(family, tmp_path):
    f32 = make_tiny_llama(tmp_path / "dpo32", init_from=family["sft"], noise=0.05, seed=3, dtype=torch.float32)
    text = describe_plan(recipe(family["sft"], f32, tmp_path / "o"))
    assert "the inputs' dtypes differ (sft: BF16, dpo: F32): each output tensor takes the base's dtype (BF16); set output.dtype" in text
    out = load_state_dict(weightx.apply(recipe(family["sft"], f32, tmp_path / "o")).path)
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert "dtypes differ" not in describe_plan(recipe(family["sft"], f32, tmp_path / "o2", dtype="float32"))
