"""The streaming engine: equal to an in-memory whole-state-dict computation, shard layout, index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import weightx
from weightx.pipeline.compute import pick_device
from weightx.pipeline.engine import write_shards
from weightx.pipeline.planner import build_plan
from weightx.recipe.model import load_recipe
from weightx.testing import load_state_dict
from conftest import expo_recipe


def reference(base: dict, models: list[dict], weights: list[float], factors: list[float], mean: bool, dtype) -> dict:
    """Whole-tensor, in-memory computation with the engine's operation order."""
    out = {}
    for name, b in base.items():
        b32 = b.to(torch.float32)
        acc = None
        for m, w, f in zip(models, weights, factors):
            d = (m[name].to(torch.float32) - b32) * f
            d = d if w == 1.0 else d * w
            acc = d if acc is None else acc + d
        if mean and len(models) > 1:
            acc = acc / len(models)
        out[name] = (b32 + acc).to(dtype)
    return out


def test_streamed_equals_in_memory_expo(family, tmp_path):
    res = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3, shard_size="120KB"))
    want = reference(load_state_dict(family["sft"]), [load_state_dict(family["dpo"])], [1.0], [1.3], False, torch.bfloat16)
    got = load_state_dict(res.path)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name


def test_streamed_equals_in_memory_weighted_mean(merge_family, tmp_path):
    f = merge_family
    doc = {
        "models": {k: str(v) for k, v in f.items()},
        "base": "base",
        "deltas": [
            {"model": "math", "weight": 0.7, "edits": [{"scale": {"factor": 1.5}}]},
            {"model": "code", "weight": 1.2},
        ],
        "combine": "mean",
        "output": {"path": str(tmp_path / "out"), "dtype": "float32", "config_from": "math"},
    }
    res = weightx.apply(doc)
    want = reference(load_state_dict(f["base"]), [load_state_dict(f["math"]), load_state_dict(f["code"])],
                     [0.7, 1.2], [1.5, 1.0], True, torch.float32)
    got = load_state_dict(res.path)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("block", [7, 1000, 1 << 18, 1 << 20])
def test_block_size_does_not_change_bytes(family, tmp_path, block):
    recipe = load_recipe(expo_recipe(family["sft"], family["dpo"], tmp_path / "unused", 0.3))
    plan = build_plan(recipe)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_shards(plan, a, pick_device("cpu"), block=block)
    write_shards(plan, b, pick_device("cpu"), block=1 << 30)
    for shard in plan.shards:
        assert (a / shard.filename).read_bytes() == (b / shard.filename).read_bytes()


def test_every_tensor_in_one_shard_and_index_total(family, tmp_path):
    res = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3, shard_size="60KB"))
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    files = sorted(res.path.glob("model*.safetensors"))
    assert len(files) == len(res.shards) >= 3
    assert [p.name for p in files] == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    seen: dict[str, str] = {}
    total = 0
    for p in files:
        with safe_open(str(p), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert name not in seen, f"{name} in {seen.get(name)} and {p.name}"
                seen[name] = p.name
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    assert set(seen) == set(load_state_dict(family["dpo"]))


def test_output_layout_and_provenance(family, tmp_path):
    res = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3))
    names = {p.name for p in res.path.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "weightx.json", "README.md",
            "model.safetensors.index.json"} <= names
    doc = json.loads((res.path / "weightx.json").read_text())
    assert doc["status"] == "complete" and doc["weightx_version"] == weightx.__version__
    assert doc["recipe"]["deltas"][0]["edits"] == [{"expo": {"alpha": 0.3}}]
    import hashlib

    for alias in ("sft", "dpo"):
        files = doc["inputs"][alias]["files"]
        assert files
        for shard, rec in files.items():
            assert rec["sha256"] == hashlib.sha256((family[alias] / shard).read_bytes()).hexdigest()
    stats = doc["tensors"]["model.norm.weight"]
    sft, dpo = load_state_dict(family["sft"]), load_state_dict(family["dpo"])
    d = dpo["model.norm.weight"].double() - sft["model.norm.weight"].double()
    assert stats["delta_norm"]["dpo"] == pytest.approx(d.norm().item(), rel=1e-5)
    assert stats["edited_norm"]["dpo"] == pytest.approx(1.3 * d.norm().item(), rel=1e-5)
    assert not list(tmp_path.glob(".out.weightx-tmp-*")), "temporary folder left behind"


@pytest.mark.parametrize("direct", ["1", "0"])
def test_output_shard_hashes_are_the_files(family, tmp_path, monkeypatch, direct):
    """The shards' sha256 are computed from the blocks as they are written (not read back): with
    small O_DIRECT stages that switch many times per shard, or buffered, the recorded hash is still
    the file's."""
    import hashlib

    from weightx.io import direct as direct_io

    monkeypatch.setattr(direct_io, "CHUNK", 64 << 10)
    monkeypatch.setenv("WEIGHTX_DIRECT_IO", direct)
    doc = expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3)
    doc["output"]["shard_size"] = "100KB"
    res = weightx.apply(doc)
    shards = json.loads((res.path / "weightx.json").read_text())["output"]["shards"]
    assert len(shards) > 1
    for entry in shards:
        assert entry["sha256"] == hashlib.sha256((res.path / entry["file"]).read_bytes()).hexdigest()


def _save(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_non_float_tensors_pass_through_from_config_from(tmp_path):
    ids = torch.arange(6, dtype=torch.int64)
    _save(tmp_path / "a.safetensors", {"w": torch.ones(4), "ids": ids})
    _save(tmp_path / "b.safetensors", {"w": torch.full((4,), 2.0), "ids": ids * 7})
    doc = expo_recipe(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out", 1.0)
    out = load_state_dict(weightx.apply(doc).path)
    assert torch.equal(out["ids"], ids * 7)
    assert out["w"].tolist() == [3.0] * 4


def test_tied_lm_head_absent_stays_absent(tmp_path):
    from transformers import AutoModelForCausalLM

    from weightx.testing import make_related_pair

    fam = make_related_pair(tmp_path / "tied", tie_embeddings=True)
    assert "lm_head.weight" not in load_state_dict(fam["dpo"])
    res = weightx.apply(expo_recipe(fam["sft"], fam["dpo"], tmp_path / "out", 0.3))
    out = load_state_dict(res.path)
    assert "lm_head.weight" not in out
    model = AutoModelForCausalLM.from_pretrained(res.path)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_transformers_loads_output_and_alpha_zero_logits_equal(family, tmp_path):
    from transformers import AutoModelForCausalLM

    res = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.0))
    ids = torch.tensor([[1, 17, 42, 99, 5, 230]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(res.path).eval()(ids).logits
        want = AutoModelForCausalLM.from_pretrained(family["dpo"]).eval()(ids).logits
    assert torch.equal(got, want)
    model = AutoModelForCausalLM.from_pretrained(weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "o3", 0.3)).path)
    assert model.dtype == torch.bfloat16


def test_naive_bf16_expo_loses_precision_ours_does_not(family, tmp_path):
    """The reference script computes p + α(p − q) in bf16; rounding twice moves some weights by ≥ 1 ulp."""
    res = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3))
    sft, dpo, out = load_state_dict(family["sft"]), load_state_dict(family["dpo"]), load_state_dict(res.path)
    differs = 0
    for name in dpo:
        p, q = dpo[name], sft[name]
        naive = p + 0.3 * (p - q)  # bf16 arithmetic throughout
        differs += int((naive.view(torch.int16) != out[name].view(torch.int16)).sum())
    assert differs > 0


def _mapped_rss_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split(" ", 1)[0] and ":" not in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_done_unmaps_a_tensor_and_it_reads_back_the_same(tmp_path):
    from weightx.io.safetensors import MappedFile, read_header

    x = torch.randn(1024, 1024)
    path = _save(tmp_path / "m.safetensors", {"a": torch.ones(3), "x": x, "z": torch.zeros(5)})
    mf = MappedFile(read_header(path))
    info = mf.header.tensors["x"]
    assert float(mf.tensor("x").sum()) == pytest.approx(float(x.sum()), rel=1e-5)
    assert _mapped_rss_kb(path) >= 4000  # 4 MB of the file's pages mapped into this process
    mf.done(info)
    assert _mapped_rss_kb(path) <= 8  # only a shared edge page may stay
    assert torch.equal(mf.tensor("x"), x.reshape(-1)) and torch.equal(mf.tensor("a"), torch.ones(3))
    mf.close()


def test_engine_unmaps_each_input_tensor_once_it_is_written(family, tmp_path, monkeypatch):
    from weightx.io.safetensors import MappedFile

    done: list[tuple[str, str]] = []
    real = MappedFile.done

    def record(self, info):
        name = next(n for n, i in self.header.tensors.items() if i is info)
        done.append((self.header.path.parent.name, name))
        real(self, info)

    monkeypatch.setattr(MappedFile, "done", record)
    weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3))
    sft = load_state_dict(family["sft"])
    for model in ("sft", "dpo"):
        mine = sorted(n for m, n in done if m == family[model].name)
        assert mine == sorted(sft), model  # every tensor of both inputs, once each
