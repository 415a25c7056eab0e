"""`output.format: delta` for sparse edits: changed positions + values, rebuilt bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import weightx
from weightx.api import describe_plan
from weightx.errors import InputError, PlanError
from weightx.testing import load_state_dict
from conftest import run_cli

INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def one_delta(family, out, edits, fmt="delta", **output) -> dict:
    return {"models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])}, "base": "sft",
            "deltas": [{"model": "dpo", "edits": edits}], "output": {"path": str(out), "format": fmt, **output}}


def rebuild(base, art, out) -> dict:
    return {"models": {"base": str(base), "art": str(art)}, "base": "base", "deltas": [{"model": "art"}],
            "output": {"path": str(out), "config_from": "base"}}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT[t.dtype])


def stored(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def same_bytes(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])), k


@pytest.mark.parametrize("edits,kind", [([{"dare": {"drop": 0.9}}], "index"), ([{"magnitude": {"density": 0.5}}], "mask"),
                                        ([{"expo": {"alpha": 0.3}}, {"dare": {"drop": 0.8, "rescale": "l1"}}], "index")])
def test_sparse_artifact_rebuilds_bit_for_bit(family, tmp_path, edits, kind):
    art = weightx.apply(one_delta(family, tmp_path / "art", edits)).path
    dense = load_state_dict(weightx.apply(one_delta(family, tmp_path / "dense", edits, fmt="dense")).path)
    base = load_state_dict(family["sft"])
    rec = json.loads((art / "weightx.json").read_text())["delta"]
    parts = stored(art)
    name = "model.layers.1.mlp.down_proj.weight"
    entry = rec["tensors"][name]
    assert entry["codec"] == "sparse" and entry["positions"] == kind
    # k is the number of entries where the dense output differs from the base, counted independently
    assert entry["k"] == int((bits(dense[name]) != bits(base[name])).sum())
    assert parts[f"{name}.values"].shape == (entry["k"],) and parts[f"{name}.values"].dtype == torch.bfloat16
    assert f"{name}.{kind}" in parts and name not in parts
    # the stored values are the dense output's, at the changed positions
    changed = torch.nonzero((bits(dense[name]) != bits(base[name])).reshape(-1)).reshape(-1)
    assert torch.equal(bits(parts[f"{name}.values"]), bits(dense[name].reshape(-1)[changed]))
    # rebuilt on its base: the dense output's bytes, every tensor
    same_bytes(load_state_dict(weightx.apply(rebuild(family["sft"], art, tmp_path / "re")).path), dense)


def test_dare_09_artifact_size(family, tmp_path):
    art = weightx.apply(one_delta(family, tmp_path / "art", [{"dare": {"drop": 0.9}}])).path
    sizes = json.loads((art / "weightx.json").read_text())["delta"]["sizes"]
    assert sizes["ops"] == {"sparse": 21}  # every tensor DARE touched (all 21: matrices, embeddings, norms) is smaller sparse
    assert sizes["whole_bytes"] == 0 and sizes["artifact_bytes"] == sizes["compressed_bytes"]
    assert sizes["ratio"] == pytest.approx(sizes["dense_bf16_delta_bytes"] / sizes["artifact_bytes"])
    sp = sizes["compressed_bytes"] / sizes["compressed_bf16_delta_bytes"]
    # 10 % of the values (bf16) plus ≈ 2 + log2(10) bits per position: ≈ 0.1 + 0.1·5.3/16 = 0.133 of the bf16 delta
    assert 0.12 < sp < 0.145, sp
    total = sum(p.stat().st_size for p in art.glob("*.safetensors"))
    dense_delta = sum(t.numel() * 2 for t in load_state_dict(family["dpo"]).values())
    assert total < 0.2 * dense_delta


def test_ties_merge_artifact(merge_family, tmp_path):
    m = merge_family
    recipe = {"models": {"base": str(m["base"]), "math": str(m["math"]), "code": str(m["code"])}, "base": "base",
              "deltas": [{"model": "math"}, {"model": "code"}], "combine": {"ties": {"density": 0.2}},
              "output": {"path": str(tmp_path / "art"), "format": "delta", "config_from": "base"}}
    art = weightx.apply(recipe).path
    dense = load_state_dict(weightx.apply({**recipe, "output": {"path": str(tmp_path / "dense"), "config_from": "base"}}).path)
    rec = json.loads((art / "weightx.json").read_text())["delta"]
    assert rec["model"] is None and rec["tensors"]
    same_bytes(load_state_dict(weightx.apply(rebuild(m["base"], art, tmp_path / "re")).path), dense)


def test_sparse_plan_and_refusal(family, tmp_path):
    text = describe_plan(one_delta(family, tmp_path / "p", [{"dare": {"drop": 0.9}}]))
    assert "sparse: 21 tensor(s) ≈" in text and "estimated from the densities" in text
    with pytest.raises(PlanError, match="neither on any tensor"):
        weightx.plan(one_delta(family, tmp_path / "q", [{"expo": {"alpha": 0.3}}]))
    # DARE with k ≠ 0 scales dropped entries instead of zeroing them: not sparse
    with pytest.raises(PlanError, match="neither on any tensor"):
        weightx.plan(one_delta(family, tmp_path / "r", [{"dare": {"drop": 0.5, "k": 0.5}}]))


def test_damaged_sparse_artifact_is_one_line(family, tmp_path):
    art = weightx.apply(one_delta(family, tmp_path / "art", [{"dare": {"drop": 0.9}}])).path
    proc = run_cli("inspect", str(art))
    assert proc.returncode == 0 and "sparse" in proc.stdout, proc.stderr
    name = "model.layers.0.mlp.up_proj.weight.index"
    index = json.loads((art / "model.safetensors.index.json").read_text())["weight_map"]
    shard = art / index[name]
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    lo, hi = header[name]["data_offsets"]
    raw[8 + n + lo:8 + n + hi] = b"\xff" * (hi - lo)  # every bit set: positions past the end
    shard.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="cannot be decoded"):
        weightx.apply(rebuild(family["sft"], art, tmp_path / "re"))
    from weightx.serving import load_delta

    with pytest.raises(InputError, match="sparse edits"):
        load_delta(art)
