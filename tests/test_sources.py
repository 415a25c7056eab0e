"""Model sources: local folder, single file, Hub ids from a pre-populated cache (offline)."""

from __future__ import annotations

import pytest
import json

import torch

from weightx.io.sources import resolve
from weightx.testing import load_state_dict, make_hf_cache
from conftest import expo_recipe, run_cli, write_recipe


def test_local_folder_and_single_file(family):
    src = resolve("dpo", str(family["dpo"]))
    assert src.kind == "local" and len(src.headers) >= 2
    single = next(family["sft"].glob("*.safetensors"))
    s2 = resolve("x", str(single))
    assert s2.kind == "file" and set(s2.weight_map) == {n for n, f in src.weight_map.items() if f == single.name}


@pytest.mark.slow
def test_hub_id_resolves_from_cache_offline(family, tmp_path):
    cache = tmp_path / "hf-cache"
    commit_sft = make_hf_cache(cache, "tiny-org/tiny-sft", family["sft"])
    commit_dpo = make_hf_cache(cache, "tiny-org/tiny-dpo", family["dpo"])
    doc = expo_recipe("tiny-org/tiny-sft", f"tiny-org/tiny-dpo@{commit_dpo}", tmp_path / "out", 0.0)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    r = run_cli("apply", str(write_recipe(tmp_path / "r.yaml", doc)), env=env)
    assert r.returncode == 0, r.stderr
    out = load_state_dict(tmp_path / "out")
    dpo = load_state_dict(family["dpo"])
    assert all(torch.equal(out[k], dpo[k]) for k in dpo)
    meta = json.loads((tmp_path / "out" / "weightx.json").read_text())
    assert meta["inputs"]["sft"]["revision"] == commit_sft
    assert meta["inputs"]["dpo"]["revision"] == commit_dpo and meta["inputs"]["dpo"]["repo_id"] == "tiny-org/tiny-dpo"
    import hashlib

    for shard, rec in meta["inputs"]["dpo"]["files"].items():
        assert rec["sha256"] == hashlib.sha256((family["dpo"] / shard).read_bytes()).hexdigest()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "tiny-org/tiny-dpo" in card


@pytest.mark.slow
def test_missing_hub_id_one_line(tmp_path, family):
    doc = expo_recipe(family["sft"], "tiny-org/not-cached", tmp_path / "out")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HOME": str(tmp_path / "hf-home")}
    r = run_cli("apply", str(write_recipe(tmp_path / "r.yaml", doc)), env=env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiny-org/not-cached" in lines[0] and "not in the local Hugging Face cache" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_index_naming_missing_shard_is_one_line(family, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(family["dpo"], broken)
    next(broken.glob("model*.safetensors")).unlink()
    r = run_cli("inspect", str(broken))
    assert r.returncode == 1 and "missing" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_inspect_shows_provenance(family, tmp_path):
    import weightx

    weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3))
    r = run_cli("inspect", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "BF16" in r.stdout and "made by     weightx" in r.stdout
    assert "expo(alpha=0.3)" in r.stdout
    j = run_cli("inspect", str(tmp_path / "out"), "--json")
    doc = json.loads(j.stdout)
    assert doc["tensor_count"] == 21 and doc["weightx"]["status"] == "complete"


