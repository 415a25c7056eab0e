"""Delta artifacts end to end: layout, sizes (incl. the BitDelta paper's Llama-2-7B formula from
headers alone), exact reconstruction, the base check, and the planning rules of format: delta."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import weightx.api as api
from weightx.errors import InputError, PlanError
from weightx.io.safetensors import OutTensor, layout_header
from weightx.testing import load_state_dict, make_hf_cache

from conftest import run_cli, write_recipe


def recipe(base: Path, ft: Path, out: Path, edits: list, fmt: str = "delta", **output) -> dict:
    return {"models": {"sft": str(base), "dpo": str(ft)}, "base": "sft",
            "deltas": [{"model": "dpo", "edits": edits}],
            "output": {"path": str(out), "format": fmt, "shard_size": "60KB", **output}}


def reconstruct(base: Path, artifact: Path, out: Path, **output) -> dict:
    return {"models": {"sft": str(base), "art": str(artifact)}, "base": "sft", "deltas": [{"model": "art"}],
            "output": {"path": str(out), **output}}


def same_bits(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ in any byte (so -0.0 vs 0.0 and NaN payloads count)."""
    assert a.keys() == b.keys()
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
            or not torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))]


PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.slow
@pytest.mark.parametrize("edits", [
    [{"bitdelta": {}}],
    [{"ternary": {"density": 0.2}}],
    [{"expo": {"alpha": 0.3}}, {"bitdelta": {"bits": 3, "group": "row", "scale_multiplier": 1.2}}],
    [{"ternary": {"density": 0.05, "scale": "mean_abs_kept", "include": ["*"]}}],
], ids=["bitdelta", "ternary", "expo+bitdelta3row", "ternary-all"])
def test_reconstruction_equals_dense_output_bit_for_bit(family, tmp_path, edits):
    dense = api.apply(recipe(family["sft"], family["dpo"], tmp_path / "dense", edits, "dense"))
    art = api.apply(recipe(family["sft"], family["dpo"], tmp_path / "art", edits))
    if "include" not in str(edits):
        assert len(art.shards) > 1  # parts and whole tensors spread over several shards
    rec = api.apply(reconstruct(family["sft"], tmp_path / "art", tmp_path / "rec"))
    assert same_bits(load_state_dict(dense.path), load_state_dict(rec.path)) == []
    # and through the CLI, with the recipe the model card suggests
    r = run_cli("apply", str(write_recipe(tmp_path / "r.yaml", reconstruct(family["sft"], tmp_path / "art", tmp_path / "rec2"))))
    assert r.returncode == 0, r.stderr
    assert same_bits(load_state_dict(dense.path), load_state_dict(tmp_path / "rec2")) == []


@pytest.mark.slow
def test_float32_round_trip_is_exact(tmp_path):
    from weightx.testing import make_related_pair

    fam = make_related_pair(tmp_path / "f32", dtype=torch.float32, max_shard_size="200KB")
    for edits in ([{"bitdelta": {}}], [{"ternary": {}}]):
        tag = next(iter(edits[0]))
        dense = api.apply(recipe(fam["sft"], fam["dpo"], tmp_path / f"{tag}-dense", edits, "dense"))
        api.apply(recipe(fam["sft"], fam["dpo"], tmp_path / f"{tag}-art", edits))
        rec = api.apply(reconstruct(fam["sft"], tmp_path / f"{tag}-art", tmp_path / f"{tag}-rec"))
        assert same_bits(load_state_dict(dense.path), load_state_dict(rec.path)) == []


def test_bitdelta_artifact_layout_and_record(family, tmp_path):
    api.apply(recipe(family["sft"], family["dpo"], tmp_path / "art", [{"bitdelta": {}}]))
    art = load_state_dict(tmp_path / "art")
    base, ft = load_state_dict(family["sft"]), load_state_dict(family["dpo"])
    meta = json.loads((tmp_path / "art" / "weightx.json").read_text())
    rec = meta["delta"]
    assert rec["encoding"] == "weightx-delta" and rec["version"] == 1 and rec["model"] == "dpo"
    # a local path outside the recipe's and working folders is recorded by its name; the sha256 identify it
    assert rec["base"]["alias"] == "sft" and rec["base"]["source"] == family["sft"].name
    for shard, info in rec["base"]["files"].items():
        assert info["sha256"] == hashlib.sha256((family["sft"] / shard).read_bytes()).hexdigest()
        assert info["size"] == (family["sft"] / shard).stat().st_size
    compressed = {n for n in ft if n.endswith(".weight") and any(p in n for p in PROJ)}
    assert set(rec["tensors"]) == compressed
    for name, t in ft.items():
        if name in compressed:
            assert name not in art
            packed, scale = art[f"{name}.packed"], art[f"{name}.scale"]
            assert packed.dtype == torch.uint8 and scale.dtype == torch.float32
            d = ft[name].double().numpy() - base[name].double().numpy()
            # independent layout: signs (δ ≥ 0) packed LSB first along the last dimension
            assert np.array_equal(packed[0].numpy(), np.packbits(d >= 0, axis=-1, bitorder="little"))
            assert float(scale[0]) == pytest.approx(np.abs(d).mean(), rel=1e-6)
            assert rec["tensors"][name]["shape"] == list(t.shape) and rec["tensors"][name]["dtype"] == "BF16"
            assert rec["tensors"][name]["scale"] == [pytest.approx(float(scale[0]))]
            approx = np.where(d >= 0, 1.0, -1.0) * float(scale[0])
            err = np.linalg.norm(d - approx) / np.linalg.norm(d)
            assert rec["tensors"][name]["relative_error"] == pytest.approx(err, rel=1e-5)
        else:  # stored whole: the fine-tuned value, bit for bit
            assert same_bits({name: art[name]}, {name: t}) == []
    index = json.loads((tmp_path / "art" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(art)
    assert meta["output"]["format"] == "delta"


def test_compressed_tensors_take_at_most_one_fifteenth_of_a_bf16_delta(family, tmp_path):
    for edits in ([{"bitdelta": {}}], [{"ternary": {"density": 0.2}}]):
        out = tmp_path / next(iter(edits[0]))
        api.apply(recipe(family["sft"], family["dpo"], out, edits))
        art = load_state_dict(out)
        meta = json.loads((out / "weightx.json").read_text())["delta"]
        numel = sum(math.prod(t["shape"]) for t in meta["tensors"].values())
        nbytes = sum(x.numel() * x.element_size() for n, x in art.items() if n.rsplit(".", 1)[0] in meta["tensors"])
        assert nbytes <= numel * 2 / 15, (edits, nbytes, numel * 2)
        assert meta["sizes"]["compressed_bytes"] == nbytes


LLAMA2_7B = dict(vocab=32000, hidden=4096, inter=11008, layers=32)


def _sparse_checkpoint(folder: Path, dtype: str = "F16") -> Path:
    """A Llama-2-7B-shaped checkpoint: real headers, sparse (unwritten) data; only headers are read."""
    h, i, v = LLAMA2_7B["hidden"], LLAMA2_7B["inter"], LLAMA2_7B["vocab"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(LLAMA2_7B["layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        shapes.update({p + f"self_attn.{m}.weight": (h, h) for m in ("q_proj", "k_proj", "v_proj", "o_proj")})
        shapes.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)})
    tensors = [OutTensor(n, dtype, s) for n, s in shapes.items()]
    header, _ = layout_header(tensors)
    folder.mkdir(parents=True)
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(t.nbytes for t in tensors))
    return folder


@pytest.mark.slow
def test_paper_size_formula_on_a_llama2_7b_shaped_plan(tmp_path):
    """METHODS §8 BitDelta 7: Σ numel/8 + 4·#matrices + fp16 bytes of the rest = 1,334,322,048 bytes
    (1.243 GiB); true ratio to the fp16 model 10.10. From headers alone."""
    base, ft = _sparse_checkpoint(tmp_path / "llama"), _sparse_checkpoint(tmp_path / "vicuna")
    plan = api.plan(recipe(base, ft, tmp_path / "out", [{"bitdelta": {}}], shard_size="5GB"))
    compressed = [t for t in plan.tensors if t.codec is not None]
    assert len(compressed) == 7 * 32
    assert plan.total_size == 1_334_322_048
    assert plan.total_size / 2**30 == pytest.approx(1.243, abs=5e-4)
    assert plan.parameter_count * 2 / plan.total_size == pytest.approx(10.10, abs=5e-3)
    r = run_cli("plan", str(write_recipe(tmp_path / "r.yaml", recipe(base, ft, tmp_path / "out", [{"bitdelta": {}}], shard_size="5GB"))))
    assert r.returncode == 0, r.stderr
    assert "1/10.10 of the model's dense bf16 delta" in r.stdout
    assert "bitdelta on 224 tensor(s)" in r.stdout and "1/16.00 of their bf16 delta" in r.stdout


@pytest.mark.slow
def test_wrong_base_is_refused_in_one_line(family, tmp_path):
    api.apply(recipe(family["sft"], family["dpo"], tmp_path / "art", [{"bitdelta": {}}]))
    # A different model with the same layout: the sha256 (cached from an earlier run, or hashed
    # during this one) differs from the recorded one.
    for wrong in (family["base"], _tampered_copy(family["sft"], tmp_path / "tampered")):
        out = tmp_path / f"rec-{wrong.name}"
        r = run_cli("apply", str(write_recipe(tmp_path / "r.yaml", reconstruct(wrong, tmp_path / "art", out))))
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert lines[0].startswith("error: base 'sft'") and "is not the model delta artifact 'art' was made against" in lines[0]
        assert "sha256" in lines[0] and "set models.sft to that exact base" in lines[0]
        assert not out.exists()
    # A base with other shard files is refused while planning, before any compute.
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(family["sft"] / "config.json", single)
    from safetensors.torch import save_file

    save_file(load_state_dict(family["sft"]), single / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="its shards are model.safetensors"):
        api.plan(reconstruct(single, tmp_path / "art", tmp_path / "x"))


def _tampered_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01  # one mantissa bit of the last tensor; same size, same header
    shard.write_bytes(bytes(data))
    return dst


def test_artifact_cannot_be_a_base_and_delta_format_rules(family, tmp_path):
    api.apply(recipe(family["sft"], family["dpo"], tmp_path / "art", [{"ternary": {}}]))
    bad = {"models": {"art": str(tmp_path / "art"), "dpo": str(family["dpo"])}, "base": "art",
           "deltas": [{"model": "dpo"}], "output": {"path": str(tmp_path / "x")}}
    with pytest.raises(PlanError, match="delta artifact, which cannot be a base"):
        api.plan(bad)

    def problems(doc: dict) -> str:
        with pytest.raises(PlanError) as e:
            api.plan(doc)
        return str(e.value)

    base = recipe(family["sft"], family["dpo"], tmp_path / "x", [{"expo": {"alpha": 0.3}}])
    assert "stores a compressing edit (bitdelta, ternary) or a sparse one" in problems(base)  # expo alone is neither
    two = recipe(family["sft"], family["dpo"], tmp_path / "x", [{"bitdelta": {}}])
    two["models"]["math"] = str(family["base"])
    two["deltas"].append({"model": "math"})
    assert "stores one compressed delta, but the recipe has 2" in problems(two)
    weighted = recipe(family["sft"], family["dpo"], tmp_path / "x", [{"bitdelta": {}}])
    weighted["deltas"][0]["weight"] = 0.5
    assert "put `- scale: {factor: 0.5}` before the compressing edit" in problems(weighted)
    order = recipe(family["sft"], family["dpo"], tmp_path / "x", [{"bitdelta": {}}, {"expo": {"alpha": 0.1}}])
    assert "bitdelta must be the last edit" in problems(order)
    nothing = recipe(family["sft"], family["dpo"], tmp_path / "x", [{"bitdelta": {"include": ["*nope*"]}}])
    assert "matches no tensor" in problems(nothing)


@pytest.mark.slow
def test_hub_base_is_recorded_with_id_revision_and_sha256(family, tmp_path):
    cache = tmp_path / "hf-cache"
    commit = make_hf_cache(cache, "tiny-org/tiny-sft", family["sft"])
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    doc = recipe("tiny-org/tiny-sft", family["dpo"], tmp_path / "art", [{"bitdelta": {}}])
    r = run_cli("apply", str(write_recipe(tmp_path / "r.yaml", doc)), env=env)
    assert r.returncode == 0, r.stderr
    base = json.loads((tmp_path / "art" / "weightx.json").read_text())["delta"]["base"]
    assert base["repo_id"] == "tiny-org/tiny-sft" and base["revision"] == commit and base["kind"] == "hub"
    for shard, info in base["files"].items():
        assert info["sha256"] == hashlib.sha256((family["sft"] / shard).read_bytes()).hexdigest()
    # Reconstruct against the same Hub id; the card's recipe names it with its revision.
    card = (tmp_path / "art" / "README.md").read_text()
    assert f"tiny-org/tiny-sft@{commit}" in card
    rec = reconstruct(f"tiny-org/tiny-sft@{commit}", tmp_path / "art", tmp_path / "rec")
    r = run_cli("apply", str(write_recipe(tmp_path / "r2.yaml", rec)), env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_inspect_shows_encoding_ratio_and_scales(family, tmp_path):
    api.apply(recipe(family["sft"], family["dpo"], tmp_path / "art", [{"bitdelta": {}}]))
    art = load_state_dict(tmp_path / "art")
    r = run_cli("inspect", str(tmp_path / "art"))
    assert r.returncode == 0, r.stderr
    assert "weightx-delta v1: bitdelta ×14" in r.stdout
    assert "of their dense bf16 delta" in r.stdout and "of the model's dense bf16 delta" in r.stdout
    name = "model.layers.1.self_attn.v_proj.weight"
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith(name))
    assert f"{float(art[name + '.scale'][0]):.6g}" in line
    doc = json.loads(run_cli("inspect", str(tmp_path / "art"), "--json").stdout)
    d = doc["delta"]
    numel = sum(math.prod(t["shape"]) for t in d["tensors"].values())
    parts = sum(x.numel() * x.element_size() for n, x in art.items() if n.rsplit(".", 1)[0] in d["tensors"])
    assert d["compressed_bytes"] == parts and d["compressed_ratio"] == pytest.approx(numel * 2 / parts)
    assert d["ratio"] == pytest.approx(doc["parameter_count"] * 2 / sum(x.numel() * x.element_size() for x in art.values()))
    assert d["tensors"][name]["scale"] == [pytest.approx(float(art[name + ".scale"][0]))]
    # the logical tensors, not the parts, are what the artifact holds
    assert doc["tensor_count"] == len(load_state_dict(family["dpo"]))


@pytest.mark.slow
def test_serving_api_applies_and_removes_deltas_exactly(family, tmp_path):
    import weightx
    from transformers import AutoModelForCausalLM

    for tag, edits in (("bit", [{"bitdelta": {"bits": 2}}]), ("ter", [{"ternary": {"density": 0.3}}])):
        api.apply(recipe(family["sft"], family["dpo"], tmp_path / tag, edits))
        api.apply(reconstruct(family["sft"], tmp_path / tag, tmp_path / f"{tag}-dense"))
    model = AutoModelForCausalLM.from_pretrained(family["sft"], dtype=torch.bfloat16)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = {tag: weightx.load_delta(tmp_path / tag) for tag in ("bit", "ter")}
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    for _ in range(2):  # switch back and forth on the one base
        for tag, delta in deltas.items():
            assert delta.nbytes < sum(v.numel() * v.element_size() for v in base_state.values())
            applied = weightx.apply_delta(model, delta)
            want = load_state_dict(tmp_path / f"{tag}-dense")
            got = model.state_dict()
            assert same_bits({k: got[k] for k in want}, want) == []
            dense = AutoModelForCausalLM.from_pretrained(tmp_path / f"{tag}-dense", dtype=torch.bfloat16)
            with torch.no_grad():
                assert torch.equal(model(ids).logits, dense(ids).logits)
            weightx.remove_delta(model, applied)
            assert same_bits(model.state_dict(), base_state) == []
    with pytest.raises(InputError, match="no weightx delta is applied"):
        weightx.remove_delta(model)
    from weightx.testing import make_tiny_llama

    other = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "wide", hidden=32, intermediate=64))
    with pytest.raises(InputError, match="does not fit this model"):
        weightx.apply_delta(other, deltas["bit"])


@pytest.mark.slow
def test_bundled_compression_recipes_run_offline(tmp_path):
    """recipes/bitdelta.yaml (distilled, shortened here), ternary.yaml and materialize.yaml on examples/tiny."""
    art = tmp_path / "bitdelta"
    r = run_cli("apply", "recipes/bitdelta.yaml", "--output", str(art), "--set", "deltas.0.edits.0.bitdelta.distill.steps=3")
    assert r.returncode == 0, r.stderr
    assert json.loads((art / "weightx.json").read_text())["distill"]["steps"] == 3
    r = run_cli("apply", "recipes/materialize.yaml", "--output", str(tmp_path / "dense"), "--set", f"models.delta={art}")
    assert r.returncode == 0, r.stderr
    r = run_cli("apply", "recipes/ternary.yaml", "--output", str(tmp_path / "ternary"))
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", str(tmp_path / "ternary"))
    assert "ternary ×14" in r.stdout


def test_serving_fixups_restore_every_bit_pattern():
    from weightx.serving import Fixup

    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(300, 64, generator=gen) * 0.02)
    base[:10] *= 1e-6  # tiny weights next to large deltas: misses of many ulps, some across zero
    base = base.to(torch.bfloat16)
    d = torch.randn(300, 64, generator=gen) * 3e-3
    back = ((base.float() + d).to(torch.bfloat16).float() - d).to(torch.bfloat16)
    fix = Fixup.between(base, back)
    assert fix.count == int((back.view(torch.int16) != base.view(torch.int16)).sum()) > 0
    assert fix.far_index.numel() > 0 and fix.steps.numel() > 0
    fix.restore(back)
    assert torch.equal(back.view(torch.int16), base.view(torch.int16))


@pytest.mark.slow
def test_reconstruction_with_many_blocks_on_a_thread_pool(family, tmp_path):
    """Blocks of several compressed tensors are decoded concurrently; each must see its own tensor."""
    from safetensors.torch import load_file

    from weightx.pipeline.engine import write_shards

    dense = api.apply(recipe(family["sft"], family["dpo"], tmp_path / "dense", [{"bitdelta": {"bits": 2}}], "dense"))
    api.apply(recipe(family["sft"], family["dpo"], tmp_path / "art", [{"bitdelta": {"bits": 2}}]))
    plan = api.plan(reconstruct(family["sft"], tmp_path / "art", tmp_path / "unused"))
    out = tmp_path / "pool"
    out.mkdir()
    write_shards(plan, out, torch.device("cpu"), block=300, workers=4)
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(f))
    assert same_bits(load_state_dict(dense.path), got) == []
