"""Issue 16 item 4, name prefixes: the same tensors under other names are mapped (printed by plan,
recorded in weightx.json, output identical to the plain run); unrelated names give one summary line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import weightx
from weightx.api import describe_plan
from weightx.errors import PlanError
from weightx.io.names import prefix_rules
from weightx.testing import load_state_dict


def renamed_copy(src, dst, rename) -> str:
    dst.mkdir()
    state = {rename(k): v for k, v in load_state_dict(src).items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    return str(dst)


def recipe(sft, dpo, out, **output) -> dict:
    return {"models": {"sft": str(sft), "dpo": str(dpo)}, "base": "sft",
            "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": 0.3}}]}], "output": {"path": str(out), **output}}


@pytest.fixture(scope="module")
def plain(family, tmp_path_factory):
    return load_state_dict(weightx.apply(recipe(family["sft"], family["dpo"], tmp_path_factory.mktemp("plain") / "o")).path)


@pytest.mark.parametrize("label,rename,shown,count", [
    ("peft", lambda k: "base_model.model." + k, "'base_model.model.' for '(none)'", 21),
    ("no-model-prefix", lambda k: k.removeprefix("model."), "'(none)' for 'model.'", 20),  # lm_head.weight keeps its name
    ("vlm-layout", lambda k: "language_model." + k, "'language_model.' for '(none)'", 21),
])
def test_a_consistent_prefix_difference_is_mapped(family, tmp_path, plain, label, rename, shown, count):
    """The fine-tune's files use other names; the output (named as config_from, the base) is the plain run's, byte for byte."""
    odd = renamed_copy(family["dpo"], tmp_path / label, rename)
    r = recipe(family["sft"], odd, tmp_path / "o", config_from="sft")
    text = describe_plan(r)
    assert f"'dpo' names its tensors differently from 'sft': read with {shown} ({count} tensors" in text
    res = weightx.apply(r)
    out = load_state_dict(res.path)
    assert set(out) == set(plain)
    for k in out:
        assert torch.equal(out[k].view(torch.int16), plain[k].view(torch.int16)), k
    rec = json.loads((res.path / "weightx.json").read_text())
    a, b = shown.split(" for ")
    assert rec["inputs"]["dpo"]["renamed"] == [{"from": a.strip("'").replace("(none)", ""), "to": b.strip("'").replace("(none)", "")}]


def test_the_base_is_renamed_when_the_config_model_is_the_fine_tune(family, tmp_path, plain):
    odd = renamed_copy(family["sft"], tmp_path / "sft-peft", lambda k: "base_model.model." + k)
    out = load_state_dict(weightx.apply(recipe(odd, family["dpo"], tmp_path / "o")).path)
    assert all(torch.equal(out[k].view(torch.int16), plain[k].view(torch.int16)) for k in plain)


def test_unrelated_names_are_one_summary_line(family, tmp_path):
    odd = renamed_copy(family["dpo"], tmp_path / "gpt", lambda k: "transformer.h." + k.replace(".", "_"))
    with pytest.raises(PlanError) as e:
        weightx.plan(recipe(family["sft"], odd, tmp_path / "o", config_from="sft"))
    assert len(e.value.problems) == 1, e.value.problems
    line = e.value.problems[0]
    assert "21 tensors of 'sft' are missing from 'dpo'" in line and "its own names look like 'transformer.h." in line
    assert "no consistent prefix" in line


def test_prefix_rules_unit():
    want = {"model.a.weight", "model.b.weight", "lm_head.weight"}
    assert prefix_rules(want, {"base_model.model.model.a.weight", "base_model.model.model.b.weight", "base_model.model.lm_head.weight"}) == (
        [("", "base_model.model.")], {n: "base_model.model." + n for n in want})
    # a one-to-one mapping only: two wanted names may not land on one input name
    assert prefix_rules({"x.w", "y.w"}, {"z.w"}) is None
    # nothing to map
    assert prefix_rules(want, want) is None
