"""Issue 16 item 7, the compatibility matrix: tiny random models of 14 architectures transformers ships,
each through ExPO (golden float64), DARE+TIES, BitDelta and ternary artifacts and back (byte-identical to
the dense output), LoRA, and distillation planning; every output loaded by its Auto class and run.

The README's table between `<!-- architectures -->` markers is this test's result; the test fails when
they differ (rerun with WEIGHTX_WRITE_ARCH_TABLE=1 to rewrite it)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weightx
from weightx.errors import WeightxError
from weightx.testing import REPO_ROOT, add_noise, build_tokenizer, load_state_dict

pytestmark = pytest.mark.slow

TEXT = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _configs() -> dict:
    import transformers as T

    vlm_text = dict(TEXT, vocab_size=520)
    return {
        "Llama (tied)": (T.LlamaConfig, T.LlamaForCausalLM, dict(TEXT, tie_word_embeddings=True)),
        "Llama (untied)": (T.LlamaConfig, T.LlamaForCausalLM, dict(TEXT, tie_word_embeddings=False)),
        "Mistral": (T.MistralConfig, T.MistralForCausalLM, TEXT),
        "Qwen2 (biases)": (T.Qwen2Config, T.Qwen2ForCausalLM, TEXT),
        "Qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(TEXT, head_dim=8)),
        "Gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(TEXT, head_dim=8)),
        "Phi3 (fused qkv)": (T.Phi3Config, T.Phi3ForCausalLM, dict(TEXT, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "GPT-2 (Conv1D)": (T.GPT2Config, T.GPT2LMHeadModel, dict(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                                bos_token_id=1, eos_token_id=2)),
        "Mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(TEXT, num_local_experts=4, num_experts_per_tok=2)),
        "Qwen2-MoE": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, dict(TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                                    shared_expert_intermediate_size=32)),
        "DeepSeek-V3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM, dict(TEXT, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                                          first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                                                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)),
        "GPT-OSS": (T.GptOssConfig, T.GptOssForCausalLM, dict(TEXT, num_local_experts=4, num_experts_per_tok=2, head_dim=8)),
        "LLaVA": (T.LlavaConfig, T.LlavaForConditionalGeneration,
                  dict(vision_config=T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                        image_size=32, patch_size=8),
                       text_config=T.LlamaConfig(**vlm_text), image_token_index=515)),
        "Qwen2-VL": (T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration,
                     dict(text_config=dict(vlm_text, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                          vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                                             spatial_merge_size=2, in_chans=3, temporal_patch_size=2),
                          image_token_id=515, video_token_id=516, vision_start_token_id=517)),
    }


def _family(root: Path, config_cls, model_cls, kwargs) -> dict[str, Path]:
    """base (random), ft1 and ft2 = base + noise, each with a tokenizer (for distillation planning)."""
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).to(torch.bfloat16)
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"])
    build_tokenizer(root / "tok", vocab_size=512)
    state = load_state_dict(paths["base"])
    for i, name in enumerate(("ft1", "ft2")):
        paths[name] = root / name
        paths[name].mkdir()
        save_file(add_noise(state, 0.05, seed=i + 1), str(paths[name] / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(paths["base"] / "config.json", paths[name] / "config.json")
    for p in paths.values():
        for f in (root / "tok").iterdir():
            shutil.copy(f, p / f.name)
    return paths


def _runs(out: Path) -> None:
    """Load with the right Auto class and run a forward pass on a few tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(out)
    auto = AutoModelForImageTextToText if "vision_config" in cfg.to_dict() else AutoModelForCausalLM
    model = auto.from_pretrained(out, dtype=torch.float32)
    logits = model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    assert torch.isfinite(logits).all()


def _same_bytes(a: Path, b: Path) -> bool:
    x, y = load_state_dict(a), load_state_dict(b)
    return set(x) == set(y) and all(torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x)


def _cell(fn) -> str:
    try:
        return fn()
    except WeightxError as e:
        assert len(getattr(e, "problems", [str(e)])) == 1, e  # one line, at plan time
        return "refused (one line)"


def run_architecture(label: str, root: Path) -> dict[str, str]:
    p = _family(root, *_configs()[label])
    models = {k: str(v) for k, v in p.items()}
    base, ft1 = load_state_dict(p["base"]), load_state_dict(p["ft1"])
    row: dict[str, str] = {}

    def expo() -> str:
        out = weightx.apply({"models": models, "base": "base", "deltas": [{"model": "ft1", "edits": [{"expo": {"alpha": 0.3}}]}],
                             "output": {"path": str(root / "expo"), "config_from": "base"}}).path
        got = load_state_dict(out)
        for name, t in got.items():
            exact = base[name].double().numpy() + 1.3 * (ft1[name].double().numpy() - base[name].double().numpy())
            tol = np.exp2(np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7) + 1e-6
            assert np.all(np.abs(t.double().numpy() - exact) <= tol), name
        _runs(out)
        return "✓"

    def dare_ties() -> str:
        out = weightx.apply({"models": models, "base": "base",
                             "deltas": [{"model": m, "edits": [{"dare": {"drop": 0.5}}]} for m in ("ft1", "ft2")],
                             "combine": {"ties": {"density": 0.5}}, "output": {"path": str(root / "ties"), "config_from": "base"}}).path
        _runs(out)
        return "✓"

    def compressed(op: str) -> str:
        r = {"models": models, "base": "base", "deltas": [{"model": "ft1", "edits": [{op: {}}]}],
             "output": {"path": str(root / f"{op}-art"), "format": "delta", "config_from": "ft1"}}
        plan = weightx.plan(r)
        from weightx.pipeline.compression import matrix_share

        done, total = matrix_share(plan)
        art = weightx.apply(r).path
        dense = weightx.apply({**r, "output": {"path": str(root / f"{op}-dense"), "config_from": "ft1"}}).path
        back = weightx.apply({"models": {"base": models["base"], "art": str(art)}, "base": "base", "deltas": [{"model": "art"}],
                              "output": {"path": str(root / f"{op}-back"), "config_from": "base"}}).path
        assert _same_bytes(dense, back)
        _runs(back)
        return f"✓ {100 * done / total:.0f}%"

    def lora() -> str:
        out = weightx.apply({"models": models, "base": "base", "deltas": [{"model": "ft1"}],
                             "output": {"path": str(root / "lora"), "format": "lora", "rank": 2}}).path
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(p["base"]), str(out)).merge_and_unload()
        assert torch.isfinite(merged(input_ids=torch.tensor([[1, 5, 9]])).logits).all()
        return "✓"

    def distill() -> str:
        (root / "cal.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
        r = {"models": models, "base": "base", "output": {"path": str(root / "d"), "format": "delta"},
             "deltas": [{"model": "ft1", "edits": [{"bitdelta": {"distill": {"data": str(root / "cal.txt"), "steps": 3,
                                                                             "batch_size": 2, "max_length": 16}}}]}]}
        weightx.plan(r)  # refusals come from planning, before anything runs
        d = json.loads((weightx.apply(r).path / "weightx.json").read_text())["distill"]
        assert d["scales_kept"] in ("learned", "initial") and np.isfinite(d["loss_before"])
        return "✓"

    row["ExPO"] = _cell(expo)
    row["DARE+TIES"] = _cell(dare_ties)
    row["BitDelta artifact ↔ dense"] = _cell(lambda: compressed("bitdelta"))
    row["ternary artifact ↔ dense"] = _cell(lambda: compressed("ternary"))
    row["LoRA"] = _cell(lora)
    row["distill"] = _cell(distill)
    return row


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, dict[str, str]]:
    return {label: run_architecture(label, tmp_path_factory.mktemp(re.sub(r"\W+", "-", label))) for label in _configs()}


def render_table(matrix: dict[str, dict[str, str]]) -> str:
    cols = list(next(iter(matrix.values())))
    lines = ["| architecture | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, row in matrix.items():
        lines.append(f"| {label} | " + " | ".join(row[c] for c in cols) + " |")
    return "\n".join(lines)


@pytest.mark.parametrize("label", ["Llama (tied)", "Llama (untied)", "Mistral", "Qwen2 (biases)", "Qwen3", "Gemma2", "Phi3 (fused qkv)"])
def test_dense_architectures_do_everything(matrix, label):
    assert all(v.startswith("✓") for v in matrix[label].values()), matrix[label]


@pytest.mark.parametrize("label", ["GPT-2 (Conv1D)", "Mixtral", "Qwen2-MoE", "DeepSeek-V3", "GPT-OSS", "LLaVA", "Qwen2-VL"])
def test_every_other_architecture_merges_and_compresses_or_refuses_in_one_line(matrix, label):
    row = matrix[label]
    for col in ("ExPO", "DARE+TIES", "BitDelta artifact ↔ dense", "ternary artifact ↔ dense"):
        assert row[col].startswith("✓"), (col, row[col])
    for col in ("LoRA", "distill"):
        assert row[col].startswith(("✓", "refused")), (col, row[col])


def test_readme_table_is_this_tests_result(matrix):
    table = render_table(matrix)
    readme = REPO_ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- architectures -->\n", "\n<!-- /architectures -->"
    if os.environ.get("WEIGHTX_WRITE_ARCH_TABLE"):
        i, j = text.index(start) + len(start), text.index(end)
        readme.write_text(text[:i] + table + text[j:], encoding="utf-8")
        text = readme.read_text(encoding="utf-8")
    assert table in text, "README's architecture table differs from this run:\n" + table
    json.dumps(matrix)  # the matrix is plain data
