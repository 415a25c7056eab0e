"""The tiny-checkpoint helpers write real HF layouts that transformers and huggingface_hub accept."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from weightx.testing import (
    REPO_ROOT,
    add_noise,
    build_tokenizer,
    load_state_dict,
    make_hf_cache,
    make_related_pair,
    make_tiny_llama,
    sha256_file,
)

EXAMPLE = REPO_ROOT / "examples" / "tiny"


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    return make_related_pair(root, with_base=True, extra=("math", "code"))


def test_pair_is_related(tmp_path: Path) -> None:
    paths = make_related_pair(tmp_path)
    assert set(paths) == {"sft", "dpo"}
    sft, dpo = load_state_dict(paths["sft"]), load_state_dict(paths["dpo"])
    assert sft.keys() == dpo.keys() and "lm_head.weight" in sft
    for name in sft:
        a, b = sft[name].float(), dpo[name].float()
        assert a.shape == b.shape and sft[name].dtype == dpo[name].dtype == torch.bfloat16
        rel = ((b - a).norm() / a.norm()).item()
        assert 0.01 < rel < 0.2, (name, rel)  # nonzero after bf16 rounding, but a small edit


def test_family_with_base_and_extras(family: dict[str, Path]) -> None:
    assert list(family) == ["base", "sft", "dpo", "math", "code"]
    states = {k: load_state_dict(v) for k, v in family.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    delta = {k: states[k][name].float() - states["base"][name].float() for k in ("sft", "math", "code")}
    # Children of base are distinct, roughly independent edits.
    cos = torch.nn.functional.cosine_similarity(delta["math"].flatten(), delta["code"].flatten(), dim=0)
    assert abs(cos.item()) < 0.2
    # dpo = sft + noise = base + 2 noises, so its distance from base is larger than sft's.
    dpo_delta = states["dpo"][name].float() - states["base"][name].float()
    assert dpo_delta.norm() > delta["sft"].norm()
    for folder in family.values():
        assert (folder / "tokenizer.json").read_bytes() == (family["base"] / "tokenizer.json").read_bytes()


def test_sharded_layout_and_index(tmp_path: Path) -> None:
    out = make_tiny_llama(tmp_path / "m", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model*.safetensors"))
    n = len(shards)
    assert n >= 2 and not (out / "model.safetensors").exists()
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        header = _header(shard)
        assert header.pop("__metadata__") == {"format": "pt"}
        for name, info in header.items():
            assert name not in seen, f"{name} in two shards"
            seen[name] = shard.name
            total += info["data_offsets"][1] - info["data_offsets"][0]
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    assert set(load_state_dict(out)) == set(seen)


def test_single_file_and_tied_embeddings(tmp_path: Path) -> None:
    out = make_tiny_llama(tmp_path / "m", tie_embeddings=True, dtype=torch.float16)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    state = load_state_dict(out)
    assert "lm_head.weight" not in state and state["model.embed_tokens.weight"].dtype == torch.float16
    child = make_tiny_llama(tmp_path / "c", init_from=out, noise=0.1, dtype=torch.float16)
    assert set(load_state_dict(child)) == set(state)


def test_add_noise_is_order_independent() -> None:
    state = {"a": torch.ones(4), "b": torch.randn(3, 5)}
    one = add_noise(state, 0.1, seed=3)
    two = add_noise(dict(reversed(list(state.items()))), 0.1, seed=3)
    assert all(torch.equal(one[k], two[k]) for k in state)
    assert not torch.equal(one["a"], state["a"])  # norms (all ones, std 0) still get noise


def test_tokenizer_is_deterministic(tmp_path: Path) -> None:
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(_digests(tmp_path / "a"))


def test_example_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(EXAMPLE / "dpo")
    ids = tok("The lighthouse keeper climbed the stairs.", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 3
    assert tok.decode(ids[0], skip_special_tokens=True) == "The lighthouse keeper climbed the stairs."
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>\nHi</s>\n<|assistant|>\n"

    logits = {}
    for name in ("sft", "dpo"):
        model = AutoModelForCausalLM.from_pretrained(EXAMPLE / name)
        assert model.dtype == torch.bfloat16 and model.config.vocab_size == len(tok)
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert logits["sft"].shape == (1, ids.shape[1], 512)
    assert not torch.equal(logits["sft"], logits["dpo"])
    assert (EXAMPLE / "sft" / "model.safetensors").exists()
    assert len(list((EXAMPLE / "dpo").glob("model-*-of-*.safetensors"))) >= 2


def test_make_example_is_deterministic_and_committed_copy_is_current(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_example", REPO_ROOT / "examples" / "make_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path / "a")])
    module.main(["--out", str(tmp_path / "b")])
    first = _digests(tmp_path / "a")
    assert first == _digests(tmp_path / "b")
    assert sum(p.stat().st_size for p in (tmp_path / "a").rglob("*") if p.is_file()) < 2_000_000
    # Weights and tokenizer must match the committed example (config.json carries transformers_version).
    committed = _digests(EXAMPLE)
    stale = [k for k, v in first.items() if not k.endswith("config.json") and committed.get(k) != v]
    assert not stale, f"examples/tiny is stale ({stale}); rerun: python examples/make_example.py"


def test_hf_cache_layout_resolves_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants, hf_hub_download, scan_cache_dir, snapshot_download
    from huggingface_hub import try_to_load_from_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import time
    cache = tmp_path / "hub"
    src = EXAMPLE / "dpo"
    commit = make_hf_cache(cache, "weightx-test/tiny-dpo", src)
    assert commit == make_hf_cache(cache, "weightx-test/tiny-dpo", src)  # idempotent, stable hash
    repo = cache / "models--weightx-test--tiny-dpo"
    assert (repo / "refs" / "main").read_text() == commit

    snapshot = Path(snapshot_download("weightx-test/tiny-dpo", cache_dir=cache))
    assert snapshot == repo / "snapshots" / commit
    assert _digests(snapshot) == _digests(src)
    for link in snapshot.iterdir():
        target = os.readlink(link)
        assert link.is_symlink() and not os.path.isabs(target) and target.startswith("../../blobs/")
        blob = Path(target).name
        if link.suffix == ".safetensors":
            assert blob == sha256_file(link)  # like an LFS blob: provenance for free
        else:
            data = link.read_bytes()
            assert blob == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    for revision in ("main", commit):
        path = hf_hub_download("weightx-test/tiny-dpo", "config.json", cache_dir=cache, revision=revision)
        assert Path(path) == snapshot / "config.json"
    cached = try_to_load_from_cache("weightx-test/tiny-dpo", "model.safetensors.index.json", cache_dir=cache)
    assert Path(cached) == snapshot / "model.safetensors.index.json"
    [info] = scan_cache_dir(cache).repos
    assert info.repo_id == "weightx-test/tiny-dpo" and info.nb_files == len(list(src.iterdir()))
    if hasattr(huggingface_hub, "get_cached_repo_tree"):
        # Recent huggingface_hub: the cached tree listing lets offline snapshot_download check completeness.
        tree = huggingface_hub.get_cached_repo_tree("weightx-test/tiny-dpo", cache_dir=cache)
        assert {f.path: f.size for f in tree} == {p.name: p.stat().st_size for p in src.iterdir()}

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained("weightx-test/tiny-dpo", cache_dir=cache)
    assert config.model_type == "llama"
