"""Issue 16 item 2 (part): the compressing edits' default covers Mixtral's experts and GPT-2's Conv1D
layers, `plan` prints the share of matrix parameters compressed and warns below 90 %, and group: row
is refused where Conv1D stores outputs as columns."""

from __future__ import annotations

import pytest
import torch

import weightx
from weightx.api import describe_plan



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
    # the 4 x 32 routers are whole on purpose and not counted
    assert "covers 100.0%" in share


def test_gpt2_conv1d_layers_are_compressed_and_row_scales_follow_outputs(tmp_path):
    """Conv1D stores [in, out]: group: row takes one scale per output (a column), numpy-checked, and the
    artifact (recorded transposed) rebuilds the dense output byte for byte."""
    import json

    import numpy as np

    from weightx.testing import load_state_dict

    from transformers import GPT2Config, GPT2LMHeadModel

    a, b = pair(tmp_path, lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)))
    plan = weightx.plan(recipe(a, b, tmp_path / "o"))
    names = {t.name for t in plan.tensors if t.codec is not None}
    assert names == {f"transformer.h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    r = {**recipe(a, b, tmp_path / "art"), "deltas": [{"model": "dpo", "edits": [{"bitdelta": {"group": "row"}}]}]}
    art = weightx.apply(r).path
    dense = weightx.apply({**r, "output": {"path": str(tmp_path / "dense")}}).path
    back = weightx.apply({"models": {"sft": a, "art": str(art)}, "base": "sft", "deltas": [{"model": "art"}],
                          "output": {"path": str(tmp_path / "back"), "config_from": "sft"}}).path
    x, y = load_state_dict(dense), load_state_dict(back)
    assert all(torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x)
    name = "transformer.h.0.mlp.c_fc.weight"  # [32 in, 128 out]
    rec = json.loads((art / "weightx.json").read_text())["delta"]["tensors"][name]
    assert rec["transposed"] is True and rec["group"] == "row"
    sa, sb = load_state_dict(a)[name].double().numpy(), load_state_dict(b)[name].double().numpy()
    d = sb - sa
    alpha = np.abs(d).mean(axis=0)  # one scale per output column
    want = sa + np.where(d >= 0, 1.0, -1.0) * alpha[None, :]
    got = x[name].double().numpy()
    assert np.all(np.abs(got - want) <= np.exp2(np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 7) + 1e-6)


def test_low_coverage_is_warned(family, tmp_path):
    r = {"models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])}, "base": "sft",
         "deltas": [{"model": "dpo", "edits": [{"bitdelta": {"include": ["*q_proj.weight"]}}]}],
         "output": {"path": str(tmp_path / "o"), "format": "delta"}}
    text = describe_plan(r)
    assert "below 90 %, check the edit's include patterns" in text
    share = float(text.split("covers ")[1].split("%")[0])
    # q_proj is 64x64 of each layer's 64·64·2 + 64·32·2 + 3·64·128 matrix parameters
    assert share == pytest.approx(100 * 4096 / (4096 * 2 + 2048 * 2 + 3 * 8192), abs=0.05)


def test_gpt_oss_stacked_experts_get_one_scale_per_expert_output(tmp_path):
    import numpy as np

    from transformers import GptOssConfig, GptOssForCausalLM

    from weightx.testing import load_state_dict

    a, b = pair(tmp_path, lambda: GptOssForCausalLM(GptOssConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                                 num_experts_per_tok=2, head_dim=8)))
    r = {**recipe(a, b, tmp_path / "art"), "deltas": [{"model": "dpo", "edits": [{"bitdelta": {"group": "row"}}]}]}
    art = weightx.apply(r).path
    dense = load_state_dict(weightx.apply({**r, "output": {"path": str(tmp_path / "dense")}}).path)
    back = load_state_dict(weightx.apply({"models": {"sft": a, "art": str(art)}, "base": "sft", "deltas": [{"model": "art"}],
                                          "output": {"path": str(tmp_path / "back"), "config_from": "sft"}}).path)
    assert all(torch.equal(dense[k].view(torch.uint8), back[k].view(torch.uint8)) for k in dense)
    name = "model.layers.0.mlp.experts.gate_up_proj"  # [4 experts, 32 in, 128 out]
    sa, sb = load_state_dict(a)[name].double().numpy(), load_state_dict(b)[name].double().numpy()
    d = sb - sa
    alpha = np.abs(d).mean(axis=1, keepdims=True)  # per expert and output column
    want = sa + np.where(d >= 0, 1.0, -1.0) * alpha
    tol = np.exp2(np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 7) + 1e-6
    assert np.all(np.abs(dense[name].double().numpy() - want) <= tol)
