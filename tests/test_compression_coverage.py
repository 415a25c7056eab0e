"""Issue 16 item 2 (part): the compressing edits' default covers Mixtral's experts and GPT-2's Conv1D
layers, `plan` prints the share of matrix parameters compressed and warns below 90 %, and group: row
is refused where Conv1D stores outputs as columns."""

from __future__ import annotations

import pytest
import torch

import weightx
from weightx.api import describe_plan
from weightx.errors import PlanError



def pair(tmp_path, make) -> tuple[str, str]:
    out = []
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        make().save_pretrained(tmp_path / name)
        out.append(str(tmp_path / name))
    return out[0], out[1]


def recipe(a, b, out, **edit) -> dict:
    return {"models": {"sft": a, "dpo": b}, "base": "sft", "deltas": [{"model": "dpo", "edits": [{"ternary": edit}]}],
            "output": {"path": str(out), "format": "delta"}}


def test_mixtral_experts_are_compressed_by_default(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    a, b = pair(tmp_path, lambda: MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                                     num_local_experts=4, num_experts_per_tok=2)))
    plan = weightx.plan(recipe(a, b, tmp_path / "o"))
    names = {t.name for t in plan.tensors if t.codec is not None}
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" not in names  # the router stays whole
    text = describe_plan(recipe(a, b, tmp_path / "o"))
    share = next(line for line in text.splitlines() if "matrix parameters" in line)
    # every matrix but the 4 x 32 router: 1 - 128 / (4·4·... ) of them
    assert "below 90" not in share and "covers 9" in share


def test_gpt2_conv1d_layers_are_compressed_and_row_scales_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    a, b = pair(tmp_path, lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)))
    plan = weightx.plan(recipe(a, b, tmp_path / "o"))
    names = {t.name for t in plan.tensors if t.codec is not None}
    assert names == {f"transformer.h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    r = {**recipe(a, b, tmp_path / "o"), "deltas": [{"model": "dpo", "edits": [{"bitdelta": {"group": "row"}}]}]}
    with pytest.raises(PlanError, match="Conv1D layers store outputs as columns; use group: tensor"):
        weightx.plan(r)


def test_low_coverage_is_warned(family, tmp_path):
    r = {"models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])}, "base": "sft",
         "deltas": [{"model": "dpo", "edits": [{"bitdelta": {"include": ["*q_proj.weight"]}}]}],
         "output": {"path": str(tmp_path / "o"), "format": "delta"}}
    text = describe_plan(r)
    assert "below 90 %, check the edit's include patterns" in text
    share = float(text.split("covers ")[1].split("%")[0])
    # q_proj is 64x64 of each layer's 64·64·2 + 64·32·2 + 3·64·128 matrix parameters
    assert share == pytest.approx(100 * 4096 / (4096 * 2 + 2048 * 2 + 3 * 8192), abs=0.05)
