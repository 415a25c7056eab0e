"""Issue 16 item 5, quantized inputs: FP8 block-scaled checkpoints are edited as their dequantized
weights (golden float64 numpy), every other quantization is refused in one line at plan time."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weightx
from weightx.api import describe_plan
from weightx.errors import PlanError
from weightx.testing import load_state_dict
from conftest import run_cli, write_recipe

BLOCK = (24, 40)  # ragged on the tiny model's 32/64/128-sized matrices


def fp8_copy(src, dst, block=BLOCK) -> dict[str, np.ndarray]:
    """Quantize the projection weights of `src` to FP8 e4m3 with per-block scales, as DeepSeek-V3 stores
    them; returns the dequantized float64 weights (what the checkpoint means)."""
    dst.mkdir()
    state = load_state_dict(src)
    out, meant = {}, {}
    for name, w in state.items():
        if not name.endswith("proj.weight"):
            out[name] = w
            continue
        w = w.float()
        rows, cols = w.shape
        br, bc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
        scale = torch.zeros(br, bc)
        q = torch.zeros_like(w, dtype=torch.float8_e4m3fn)
        for i in range(br):
            for j in range(bc):
                blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
                s = float(blk.abs().max()) / 448.0 or 1.0
                scale[i, j] = s
                q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (blk / s).to(torch.float8_e4m3fn)
        out[name], out[name + "_scale_inv"] = q, scale
        s64 = scale.double().numpy()
        meant[name] = q.double().numpy() * np.repeat(np.repeat(s64, block[0], 0), block[1], 1)[:rows, :cols]
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, dst / f.name)
    return meant


def recipe(sft, dpo, out, **output) -> dict:
    return {"models": {"sft": str(sft), "dpo": str(dpo)}, "base": "sft",
            "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": 0.3}}]}], "output": {"path": str(out), **output}}


def test_fp8_block_scaled_fine_tune_is_edited_dequantized(family, tmp_path):
    meant = fp8_copy(family["dpo"], tmp_path / "dpo-fp8")
    r = recipe(family["sft"], tmp_path / "dpo-fp8", tmp_path / "out")
    text = describe_plan(r)
    assert "'dpo' is FP8 block-scaled (14 tensors, blocks of [24, 40]): read dequantized" in text
    res = weightx.apply(r)
    out, sft = load_state_dict(res.path), load_state_dict(family["sft"])
    assert not any(k.endswith("_scale_inv") for k in out)  # scales are not weights
    for name, deq in meant.items():
        exact = sft[name].double().numpy() + 1.3 * (deq - sft[name].double().numpy())
        ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
        slack = 8 * 2.0**-24 * (np.abs(sft[name].double().numpy()) + 1.3 * np.abs(deq))
        assert out[name].dtype == torch.bfloat16
        assert np.all(np.abs(out[name].double().numpy() - exact) <= 0.5 * ulp + slack), name
    cfg = json.loads((res.path / "config.json").read_text())
    assert "quantization_config" not in cfg  # the output is not FP8
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(res.path)(input_ids=torch.tensor([[1, 2, 3]]))


def test_fp8_base_writes_bfloat16(family, tmp_path):
    fp8_copy(family["sft"], tmp_path / "sft-fp8")
    out = load_state_dict(weightx.apply(recipe(tmp_path / "sft-fp8", family["dpo"], tmp_path / "o")).path)
    assert out["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "hqq"])
def test_other_quantizations_are_refused_in_one_line(family, tmp_path, method):
    q = tmp_path / method
    shutil.copytree(family["dpo"], q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (q / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("plan", str(write_recipe(tmp_path / "r.yaml", recipe(family["sft"], q, tmp_path / "o"))))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"is quantized with {method}" in proc.stderr and "unquantized" in proc.stderr
    assert proc.stderr.count("\n") <= 2


def test_a_bare_quantized_file_is_recognised_by_its_tensors(family, tmp_path):
    state = load_state_dict(family["dpo"])
    state["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(4, 4, dtype=torch.int32)
    save_file(state, str(tmp_path / "gptq.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PlanError, match="quantized with GPTQ/AWQ"):
        weightx.plan(recipe(family["sft"], tmp_path / "gptq.safetensors", tmp_path / "o", config_from="sft"))


def test_wrong_scale_shape_is_one_line(family, tmp_path):
    fp8_copy(family["dpo"], tmp_path / "bad", block=(24, 40))
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [32, 32]  # the scales were made for 24 x 40
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PlanError, match="in blocks of \\[32, 32\\] needs"):
        weightx.plan(recipe(family["sft"], tmp_path / "bad", tmp_path / "o"))


FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4_pack(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GPT-OSS expert weight [E, in, out] as MXFP4 blocks [E, out, in/32, 16] and scales [E, out, in/32]
    (transformers' layout: rows are outputs, 32 inputs per scale, low nibble first); and what it means."""
    e, n_in, n_out = w.shape
    rows = w.transpose(0, 2, 1).reshape(e, n_out, n_in // 32, 32)
    exp = np.ceil(np.log2(np.maximum(np.abs(rows).max(-1), 1e-30) / 6.0)).astype(np.int32)
    q = rows / np.exp2(exp)[..., None]
    code = np.abs(q[..., None] - FP4[None, None, None, None, :8] * np.sign(q[..., None] + 1e-30)).argmin(-1)
    code = np.where(q < 0, code + 8, code).astype(np.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    scales = (exp + 127).astype(np.uint8)
    meant = (FP4[code] * np.exp2(exp)[..., None]).reshape(e, n_out, n_in).transpose(0, 2, 1)
    return blocks, scales, meant


def test_mxfp4_experts_are_edited_dequantized(tmp_path):
    """A GPT-OSS fine-tune whose experts ship as MXFP4: ExPO against the bf16 base uses the weights the
    blocks stand for (an independent numpy decode of transformers' layout)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=16)
    GptOssForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = load_state_dict(tmp_path / "base")
    tuned = {k: (v.float() + 0.02 * torch.randn_like(v.float())).to(v.dtype) for k, v in base.items()}
    meant, out_state = {}, {}
    for k, v in tuned.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, meant[k] = mxfp4_pack(v.double().numpy())
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # transformers' own decode agrees

            theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
            assert np.array_equal(theirs.double().numpy(), meant[k]), k
            out_state[k + "_blocks"], out_state[k + "_scales"] = (torch.from_numpy(np.ascontiguousarray(x)) for x in (blocks, scales))
        else:
            out_state[k] = v
    (tmp_path / "ft").mkdir()
    save_file(out_state, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    doc = json.loads((tmp_path / "base" / "config.json").read_text())
    doc["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "router", "embed", "lm_head"]}
    (tmp_path / "ft" / "config.json").write_text(json.dumps(doc))
    r = recipe(tmp_path / "base", tmp_path / "ft", tmp_path / "out")
    assert "holds 2 MXFP4 tensor(s)" in describe_plan(r)
    res = weightx.apply(r)
    out = load_state_dict(res.path)
    assert not any(k.endswith(("_blocks", "_scales")) for k in out)
    for k, deq in meant.items():
        b = base[k].double().numpy()
        exact = b + 1.3 * (deq - b)
        ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
        assert out[k].shape == base[k].shape and np.all(np.abs(out[k].double().numpy() - exact) <= 0.5 * ulp + 1e-6), k
    assert "quantization_config" not in json.loads((res.path / "config.json").read_text())

