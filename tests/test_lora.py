"""`output.format: lora`: truncated-SVD LoRA extraction, checked against float64 numpy SVD and peft."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import weightx
from weightx.api import describe_plan
from weightx.errors import RecipeError
from weightx.testing import load_state_dict
from conftest import run_cli, write_recipe

ALPHA = 0.3
TARGET = "model.layers.0.self_attn.q_proj.weight"


def lora_recipe(family, out, **output) -> dict:
    return {"models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])}, "base": "sft",
            "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": ALPHA}}]}],
            "output": {"path": str(out), "format": "lora", "dtype": "float32", **output}}


def exact_delta(family) -> dict[str, np.ndarray]:
    sft, dpo = load_state_dict(family["sft"]), load_state_dict(family["dpo"])
    return {k: (1 + ALPHA) * (dpo[k].double().numpy() - sft[k].double().numpy()) for k in dpo}


def factors(folder, module):
    w = load_file(folder / "adapter_model.safetensors")
    a = w[f"base_model.model.{module}.lora_A.weight"].double().numpy()
    b = w[f"base_model.model.{module}.lora_B.weight"].double().numpy()
    return a, b


@pytest.fixture(scope="module")
def rank4(family, tmp_path_factory):
    return weightx.apply(lora_recipe(family, tmp_path_factory.mktemp("lora") / "r4", rank=4)).path


def test_lora_error_is_the_svd_tail(family, rank4):
    deltas = exact_delta(family)
    rec = json.loads((rank4 / "weightx.json").read_text())
    targets = [k for k in deltas if k.endswith("proj.weight")]
    assert len(targets) == 14
    for name in targets:
        d = deltas[name]
        s = np.linalg.svd(d, compute_uv=False)
        tail = np.sqrt((s[4:] ** 2).sum() / (s ** 2).sum())
        a, b = factors(rank4, name.removesuffix(".weight"))
        assert a.shape == (4, d.shape[1]) and b.shape == (d.shape[0], 4)
        err = np.linalg.norm(d - b @ a) / np.linalg.norm(d)
        assert err == pytest.approx(tail, rel=1e-4), name
        assert rec["tensors"][name]["rank"] == 4
        assert rec["tensors"][name]["svd_tail"] == pytest.approx(tail, rel=1e-5), name
        assert rec["tensors"][name]["relative_error"] == pytest.approx(err, rel=1e-4), name  # the stored factors' own
        # B·A is the best rank-4 approximation (Eckart–Young), not just one as good
        u, sv, vh = np.linalg.svd(d, full_matrices=False)
        best = (u[:, :4] * sv[:4]) @ vh[:4]
        assert np.linalg.norm(b @ a - best) <= 1e-5 * np.linalg.norm(d), name


def test_lora_layout_and_peft_merge(family, rank4):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    files = {p.name for p in rank4.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "weightx.json", "README.md"} <= files
    assert "config.json" not in files and "model.safetensors.index.json" not in files
    cfg = json.loads((rank4 / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["rank_pattern"] == {}
    assert TARGET.removesuffix(".weight") in cfg["target_modules"]
    assert "model.embed_tokens" in cfg["modules_to_save"] and "lm_head" in cfg["modules_to_save"]
    assert "library_name: peft" in (rank4 / "README.md").read_text()
    from weightx.pipeline.card import relation

    record = json.loads((rank4 / "weightx.json").read_text())
    record["inputs"]["sft"].update(kind="hub", repo_id="org/sft")  # as published from a Hub base
    assert relation(record) == "adapter"

    base = AutoModelForCausalLM.from_pretrained(family["sft"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(rank4)).merge_and_unload().state_dict()
    sft = load_state_dict(family["sft"])
    dense = load_state_dict(weightx.apply({**lora_recipe(family, rank4.parent / "dense"),
                                           "output": {"path": str(rank4.parent / "dense"), "dtype": "float32"}}).path)
    for name, w in merged.items():
        if name.endswith("proj.weight"):
            a, b = factors(rank4, name.removesuffix(".weight"))
            want = sft[name].double().numpy() + b @ a
            np.testing.assert_allclose(w.double().numpy(), want, rtol=0, atol=2e-6, err_msg=name)
        else:  # saved whole: exactly the dense ExPO output
            assert torch.equal(w, dense[name]), name


def test_lora_error_recorded_for_bf16_factors(family, tmp_path):
    """With bf16 factors the recorded error is that of the rounded factors, not the SVD tail."""
    out = weightx.apply(lora_recipe(family, tmp_path / "bf", rank=4, dtype="bfloat16")).path
    rec = json.loads((out / "weightx.json").read_text())["tensors"][TARGET]
    d = exact_delta(family)[TARGET]
    a, b = factors(out, TARGET.removesuffix(".weight"))
    assert rec["relative_error"] == pytest.approx(np.linalg.norm(d - b @ a) / np.linalg.norm(d), rel=2e-3)
    assert rec["relative_error"] > rec["svd_tail"]


def test_lora_rank_by_energy(family, tmp_path):
    out = weightx.apply(lora_recipe(family, tmp_path / "e", energy=0.6, max_rank=20)).path
    deltas = exact_delta(family)
    cfg = json.loads((out / "adapter_config.json").read_text())
    ranks = {}
    for name, d in deltas.items():
        if not name.endswith("proj.weight"):
            continue
        s2 = np.linalg.svd(d, compute_uv=False) ** 2
        want = min(int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.6)) + 1, 20)
        ranks[name.removesuffix(".weight")] = want
        a, _ = factors(out, name.removesuffix(".weight"))
        assert a.shape[0] == want, name
    assert len(set(ranks.values())) > 1  # the test exercises rank_pattern
    for module, r in ranks.items():
        assert cfg["rank_pattern"].get(module, cfg["r"]) == r
        assert cfg["alpha_pattern"].get(module, cfg["lora_alpha"]) == r  # scaling α/r = 1 everywhere
    capped = weightx.apply(lora_recipe(family, tmp_path / "cap", energy=0.99, max_rank=3)).path
    a, _ = factors(capped, TARGET.removesuffix(".weight"))
    assert a.shape[0] == 3


def test_lora_plan_and_refusals(family, tmp_path):
    text = describe_plan(lora_recipe(family, tmp_path / "p", rank=8))
    assert "format lora" in text and "14 linear weight(s) factored by exact SVD at rank 8" in text
    for output, msg in [({"rank": 4, "energy": 0.9}, "either rank"), ({}, "either rank"),
                        ({"energy": 0.9, "max_rank": 0}, "greater than 0"), ({"rank": 4, "max_rank": 8}, "max_rank caps")]:
        with pytest.raises(RecipeError, match=msg):
            weightx.plan(lora_recipe(family, tmp_path / "x", **output))
    r = lora_recipe(family, tmp_path / "x")
    r["output"] = {"path": str(tmp_path / "x"), "rank": 4}
    with pytest.raises(RecipeError, match="only apply to format: lora"):
        weightx.plan(r)
    proc = run_cli("plan", str(write_recipe(tmp_path / "r.yaml", r)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "format: lora" in proc.stderr


def test_lora_adapter_evaluates_as_base_plus_adapter(family, rank4):
    """`weightx eval` on an adapter folder loads its base and merges the adapter."""
    from weightx.validate.runner import EvalSettings, load_model

    model, tok = load_model(rank4, EvalSettings(device="cpu"))
    sft = load_state_dict(family["sft"])
    a, b = factors(rank4, TARGET.removesuffix(".weight"))
    got = model.state_dict()[TARGET].double().numpy()
    np.testing.assert_allclose(got, sft[TARGET].double().numpy() + b @ a, rtol=0, atol=2e-6)
    assert tok is not None


def test_lora_of_a_zero_delta_is_one_line(family, tmp_path):
    r = lora_recipe(family, tmp_path / "z", rank=4)
    r["models"]["dpo"] = str(family["sft"])
    r["models"]["twin"] = str(family["sft"])
    r["deltas"] = [{"model": "twin"}]
    r["models"].pop("dpo")
    proc = run_cli("apply", str(write_recipe(tmp_path / "z.yaml", r)))
    assert proc.returncode == 2 and "nothing to factor" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "z").exists()


def test_lora_refuses_conv1d_models_at_plan_time(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    paths = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    r = {"models": paths, "base": "a", "deltas": [{"model": "b"}], "output": {"path": str(tmp_path / "o"), "format": "lora", "rank": 2}}
    proc = run_cli("plan", str(write_recipe(tmp_path / "g.yaml", r)))
    assert proc.returncode != 0 and "Conv1D" in proc.stderr and "Traceback" not in proc.stderr


def test_lora_randomized_svd_is_seeded_and_near_optimal(family, tmp_path):
    outs = [weightx.apply(lora_recipe(family, tmp_path / f"rs{i}", rank=4, svd="randomized")).path for i in range(2)]
    assert (outs[0] / "adapter_model.safetensors").read_bytes() == (outs[1] / "adapter_model.safetensors").read_bytes()
    rec = json.loads((outs[0] / "weightx.json").read_text())["tensors"]
    for name, d in exact_delta(family).items():
        if not name.endswith("proj.weight"):
            continue
        s = np.linalg.svd(d, compute_uv=False)
        tail = np.sqrt((s[4:] ** 2).sum() / (s ** 2).sum())
        a, b = factors(outs[0], name.removesuffix(".weight"))
        err = np.linalg.norm(d - b @ a) / np.linalg.norm(d)
        assert rec[name]["svd"] == "randomized" and rec[name]["svd_tail"] is None
        assert rec[name]["relative_error"] == pytest.approx(err, rel=1e-4)
        assert tail <= err <= 1.02 * tail, name  # never better than the optimum, and close to it
    with pytest.raises(RecipeError, match="needs a fixed rank"):
        weightx.plan(lora_recipe(family, tmp_path / "x", energy=0.5, svd="randomized"))


def test_lora_embeddings_factored_when_asked(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = weightx.apply(lora_recipe(family, tmp_path / "emb", rank=6, embeddings="lora")).path
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head"} <= set(cfg["target_modules"])
    assert "model.embed_tokens" not in (cfg["modules_to_save"] or [])
    w = load_file(out / "adapter_model.safetensors")
    ea, eb = (w[f"base_model.model.model.embed_tokens.lora_embedding_{x}"].double().numpy() for x in "AB")
    d = exact_delta(family)["model.embed_tokens.weight"]
    assert ea.shape == (6, d.shape[0]) and eb.shape == (d.shape[1], 6)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(family["sft"], dtype=torch.float32),
                                       str(out)).merge_and_unload().state_dict()
    sft = load_state_dict(family["sft"])
    np.testing.assert_allclose(merged["model.embed_tokens.weight"].double().numpy(),
                               sft["model.embed_tokens.weight"].double().numpy() + (eb @ ea).T, rtol=0, atol=2e-6)
    la, lb = factors(out, "lm_head")
    np.testing.assert_allclose(merged["lm_head.weight"].double().numpy(), sft["lm_head.weight"].double().numpy() + lb @ la,
                               rtol=0, atol=2e-6)
    s = np.linalg.svd(d, compute_uv=False)
    err = np.linalg.norm(d.T - eb @ ea) / np.linalg.norm(d)
    assert err == pytest.approx(np.sqrt((s[6:] ** 2).sum() / (s ** 2).sum()), rel=1e-4)


@pytest.mark.slow
def test_lora_on_a_hub_base_names_it_and_evaluates(family, tmp_path):
    """adapter_config.json names a Hub base by its id (portable); `weightx eval` finds it in the cache."""
    from weightx.testing import make_hf_cache

    cache = tmp_path / "hf-cache"
    make_hf_cache(cache, "tiny-org/tiny-sft", family["sft"])
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    r = lora_recipe(family, tmp_path / "hub-lora", rank=4)
    r["models"]["sft"] = "tiny-org/tiny-sft"
    proc = run_cli("apply", str(write_recipe(tmp_path / "h.yaml", r)), env=env)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp_path / "hub-lora" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-org/tiny-sft" and len(cfg["revision"]) == 40
    proc = run_cli("eval", str(tmp_path / "hub-lora"), "--tasks", "weightx_ppl", "--limit", "2", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "bits_per_byte" in proc.stdout


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_an_interrupted_lora_or_sparse_run_leaves_nothing_that_looks_finished(family, tmp_path, monkeypatch, exc):
    import weightx.pipeline.lora as lora
    import weightx.pipeline.sparse_output as sparse_output

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(lora, "write_spooled", boom)
    monkeypatch.setattr(sparse_output, "write_spooled", boom)
    runs = [lora_recipe(family, tmp_path / "l", rank=2),
            {"models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])}, "base": "sft",
             "deltas": [{"model": "dpo", "edits": [{"dare": {"drop": 0.9}}]}], "output": {"path": str(tmp_path / "s"), "format": "delta"}}]
    for r in runs:
        with pytest.raises(type(exc)):
            weightx.apply(r)
    assert not (tmp_path / "l").exists() and not (tmp_path / "s").exists()
    assert not list(tmp_path.rglob("*.spool"))  # scratch files never outlive the run
