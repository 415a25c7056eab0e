"""The model card: front matter parsed back with huggingface_hub, body facts, rebuild from weightx.json."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from weightx.pipeline.card import MARKER, RELATIONS, refresh_card, render_card, render_record
from weightx.edits.expo import PAPER as EXPO_PAPER

REPO = Path(__file__).resolve().parents[1]
SFT, DPO = "HuggingFaceH4/mistral-7b-sft-beta", "HuggingFaceH4/zephyr-7b-beta"
REV_SFT, REV_DPO = "a" * 40, "b" * 40
# The values the Hub documents for base_model_relation (hub-docs model-cards "Specifying a base model").
HUB_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def hub(repo_id: str, rev: str) -> dict:
    return {"source": f"{repo_id}@{rev}", "kind": "hub", "repo_id": repo_id, "revision": rev,
            "files": {"model.safetensors": {"size": 10, "sha256": "c" * 64}}}


def local(path: str) -> dict:
    return {"source": path, "kind": "local", "repo_id": None, "revision": None,
            "files": {"model.safetensors": {"size": 10, "sha256": "d" * 64}}}


def expo_record(**extra) -> dict:
    recipe = {"name": "zephyr-7b-expo", "models": {"sft": SFT, "dpo": DPO}, "base": "sft",
              "output": {"path": "/home/someone/out/zephyr-7b-expo", "format": "dense", "shard_size": "5GB"},
              "deltas": [{"model": "dpo", "weight": 1.0, "edits": [{"expo": {"alpha": 0.3}}]}], "combine": "sum"}
    rec = {"weightx_version": "0.1.0", "recipe": recipe,
           "inputs": {"sft": hub(SFT, REV_SFT), "dpo": hub(DPO, REV_DPO)},
           "output": {"format": "dense", "dtype": "bfloat16", "parameter_count": 7_241_732_096,
                      "shards": [{"file": "model-00001-of-00002.safetensors"}, {"file": "model-00002-of-00002.safetensors"}]}}
    rec.update(extra)
    return rec


def meta_of(text: str) -> dict:
    return ModelCard(text).data.to_dict()


def test_expo_card_front_matter_parses_back():
    text = render_record(expo_record())
    meta = meta_of(text)
    assert meta["base_model"] == [SFT, DPO]
    assert meta["base_model_relation"] == "merge"  # several inputs
    assert meta["tags"] == ["weightx", "expo"]
    assert meta["library_name"] == "transformers"
    assert "model-index" not in meta  # no validation recorded


def test_expo_card_body_says_what_was_done():
    text = render_record(expo_record())
    assert "ExPO extrapolation α=0.3 from mistral-7b-sft-beta through zephyr-7b-beta." in text
    assert f"[paper]({EXPO_PAPER})" in text and EXPO_PAPER == "https://arxiv.org/abs/2404.16792"
    assert f"`{REV_SFT}`" in text and f"`{REV_DPO}`" in text  # input revisions
    assert "c" * 64 in text  # input hashes
    assert "7,241,732,096 parameters" in text and "bfloat16" in text
    # The recipe as run, verbatim, in a YAML block.
    block = re.search(r"```yaml\n(.*?)```", text.split("## Recipe")[1], re.S).group(1)
    assert yaml.safe_load(block) == expo_record()["recipe"]
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == MARKER


def test_local_inputs_are_left_out_of_base_model():
    rec = expo_record()
    rec["inputs"]["dpo"] = local("/home/someone/ckpt/zephyr-dpo")
    meta = meta_of(render_record(rec))
    assert meta["base_model"] == [SFT]
    assert meta["base_model_relation"] == "finetune"
    text = render_record(rec)
    assert "from mistral-7b-sft-beta through dpo." in text
    assert "/home/someone/ckpt" not in text.split("## Recipe")[0]  # only the recipe block shows local paths

    rec["inputs"]["sft"] = local("/data/sft")
    meta = meta_of(render_record(rec))
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["tags"] == ["weightx", "expo"] and meta["library_name"] == "transformers"


def test_inputs_used_only_for_comparison_are_not_base_models():
    rec = expo_record()
    rec["recipe"]["models"]["other"] = "org/other"
    rec["inputs"]["other"] = hub("org/other", "e" * 40)
    assert meta_of(render_record(rec))["base_model"] == [SFT, DPO]


def test_merge_of_several_deltas_names_the_combine():
    rec = expo_record()
    rec["recipe"]["models"]["code"] = "org/code"
    rec["inputs"]["code"] = hub("org/code", "f" * 40)
    rec["recipe"]["deltas"].append({"model": "code", "weight": 0.5, "edits": [{"scale": {"factor": 2.0}}]})
    rec["recipe"]["combine"] = "mean"
    text = render_record(rec)
    meta = meta_of(text)
    assert meta["base_model"] == [SFT, DPO, "org/code"] and meta["base_model_relation"] == "merge"
    assert meta["tags"] == ["weightx", "expo", "scale", "mean"]
    assert "through code with weight 0.5" in text and "combined by mean" in text


def test_compressed_delta_is_quantized_and_explains_reconstruction():
    rec = expo_record()
    rec["inputs"] = {"sft": hub(SFT, REV_SFT), "dpo": local("/x/dpo")}
    rec["recipe"]["deltas"][0]["edits"].append({"bitdelta": {"bits": 1}})
    rec["recipe"]["output"]["format"] = "delta"
    rec["output"]["format"] = "delta"
    text = render_record(rec, repo_id="me/zephyr-bitdelta")
    meta = meta_of(text)
    assert meta["base_model"] == [SFT] and meta["base_model_relation"] == "quantized"
    assert "library_name" not in meta  # transformers cannot load a delta artifact by itself
    assert "bitdelta" in meta["tags"] and "weightx-delta" in meta["tags"]
    section = text.split("## Reconstructing the full model")[1].split("## Recipe")[0]
    doc = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    assert doc["models"] == {"base": f"{SFT}@{REV_SFT}", "delta": "me/zephyr-bitdelta"}
    assert doc["base"] == "base" and doc["deltas"] == [{"model": "delta"}]
    assert "weightx apply reconstruct.yaml" in section
    from weightx.recipe.model import validate_recipe

    validate_recipe(doc)  # the reconstruction recipe is a valid weightx recipe


def test_uncompressed_delta_is_not_quantized():
    rec = expo_record()
    rec["output"]["format"] = "delta"
    assert meta_of(render_record(rec))["base_model_relation"] == "merge"
    # weightx.json["delta"] lists the compressed tensors (written by the delta-artifact writer).
    rec["delta"] = {"encoding": "weightx-delta", "tensors": {"w": {"codec": "sign"}}}
    assert meta_of(render_record(rec))["base_model_relation"] == "quantized"


def test_relations_are_values_the_hub_accepts():
    assert set(RELATIONS) == HUB_RELATIONS


def validation(passed: bool = True) -> dict:
    return {"passed": passed, "results": {
        "output": {"arc_easy": {"acc,none": {"value": 0.7512, "stderr": 0.0123}, "acc_norm,none": {"value": 0.7, "stderr": None}},
                   "weightx_smoke": {"acc": {"value": 0.5, "stderr": 0.05}}},
        "dpo": {"arc_easy": {"acc,none": {"value": 0.7401, "stderr": 0.0125}}}}}


def test_validation_becomes_model_index_and_a_table():
    rec = expo_record(validation=validation())
    rec["recipe"]["validate"] = {"tasks": ["arc_easy", "weightx_smoke"], "limit": 200, "compare": ["dpo"],
                                 "require": {"arc_easy/acc": ">= dpo - 0.01"}}
    text = render_record(rec)
    card = ModelCard(text)
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("arc_easy", "acc"): 0.7512, ("arc_easy", "acc_norm"): 0.7, ("weightx_smoke", "acc"): 0.5}
    assert card.data.model_name == "zephyr-7b-expo"
    assert all(r.dataset_args == {"limit": 200} for r in card.data.eval_results)
    assert "model-index" in yaml.safe_load(text.split("---")[1])
    assert "| task | metric | output | dpo |" in text
    assert "| arc_easy | acc | 0.7512 ± 0.0123 | 0.7401 ± 0.0125 |" in text
    assert "| weightx_smoke | acc | 0.5000 ± 0.0500 | n/a |" in text
    assert "Validation **passed**" in text and "limit 200 per task" in text and "`arc_easy/acc >= dpo - 0.01`" in text
    assert "Validation **FAILED**" in render_record(expo_record(validation=validation(False)))


def test_validation_as_recorded_by_weightx_validate():
    v = validation(False)
    v.update({"settings": {"limit": 50, "num_fewshot": 0, "batch_size": 1}, "lm_eval_version": "0.4.13",
              "gates": [{"gate": "arc_easy/acc", "condition": ">= dpo + 0.05", "passed": False, "value": 0.7512,
                         "threshold": 0.7901, "reference": "dpo", "reference_value": 0.7401}]})
    text = render_record(expo_record(validation=v))
    assert "Validation **FAILED** (lm-eval 0.4.13, limit 50 per task, 0-shot)." in text
    assert "- `arc_easy/acc >= dpo + 0.05` failed: 0.7512 vs 0.7901" in text
    assert all(r.dataset_args == {"limit": 50, "num_fewshot": 0} for r in ModelCard(text).data.eval_results)


def test_unknown_method_falls_back_to_recorded_params():
    rec = expo_record()
    rec["recipe"]["deltas"][0]["edits"] = [{"frobnicate": {"level": 3}}]
    text = render_record(rec)
    assert "frobnicate(level=3) from mistral-7b-sft-beta" in text
    assert meta_of(text)["tags"] == ["weightx", "frobnicate"]


# ------------------------------------------------------------------------ from a real output


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    import weightx

    out = tmp_path_factory.mktemp("card") / "tiny-expo"
    weightx.apply(REPO / "recipes" / "quickstart.yaml", output=out, push=False)
    return out


def test_card_written_by_apply_is_rebuilt_from_weightx_json_alone(output):
    record = json.loads((output / "weightx.json").read_text())
    written = (output / "README.md").read_text()
    assert render_record(record) == written
    assert refresh_card(output) == (written, False)
    meta = meta_of(written)
    assert meta["tags"] == ["weightx", "expo"] and "base_model" not in meta  # local inputs only
    assert "ExPO extrapolation α=0.3 from sft through dpo." in written


def test_render_card_from_a_plan():
    from weightx.api import plan  # `weightx.pipeline.plan` is also the name of a module

    text = render_card(plan(REPO / "recipes" / "quickstart.yaml"))
    assert "ExPO extrapolation α=0.3" in text and meta_of(text)["library_name"] == "transformers"


def test_refresh_card_regenerates_ours_and_keeps_the_users(output, tmp_path):
    folder = tmp_path / "o"
    shutil.copytree(output, folder)
    record = json.loads((folder / "weightx.json").read_text())
    record["validation"] = validation()
    (folder / "weightx.json").write_text(json.dumps(record))
    text, changed = refresh_card(folder)
    assert changed and (folder / "README.md").read_text() == text and "## Validation" in text
    (folder / "README.md").write_text("# my own card\n")
    assert refresh_card(folder) == ("# my own card\n", False)
    assert (folder / "README.md").read_text() == "# my own card\n"


def test_the_delta_cards_reconstruction_recipe_rebuilds_the_model(tmp_path):
    """Follow the card's instructions (paths filled in) and get the dense output bit for bit."""
    import torch

    from weightx.api import apply
    from weightx.testing import load_state_dict

    ex = REPO / "examples" / "tiny"
    doc = {"name": "tiny-bitdelta", "models": {"sft": str(ex / "sft"), "dpo": str(ex / "dpo")}, "base": "sft",
           "deltas": [{"model": "dpo", "edits": [{"bitdelta": {}}]}], "output": {"path": str(tmp_path / "art"), "format": "delta"}}
    apply(doc, push=False)
    text = (tmp_path / "art" / "README.md").read_text()
    assert "library_name" not in meta_of(text) and "bitdelta" in meta_of(text)["tags"]
    section = text.split("## Reconstructing the full model")[1]
    rebuild = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    rebuild["models"] = {"base": str(ex / "sft"), "delta": str(tmp_path / "art")}  # the placeholders, filled in
    rebuild["output"]["path"] = str(tmp_path / "rebuilt")
    apply(rebuild, push=False)
    dense = {**doc, "output": {"path": str(tmp_path / "dense")}}
    apply(dense, push=False)
    a, b = load_state_dict(tmp_path / "rebuilt"), load_state_dict(tmp_path / "dense")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
