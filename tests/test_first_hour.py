"""The rough edges of a new user's first hour (issue: set-up, fail fast, mergekit habits)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import expo_recipe, write_recipe
from weightx.cli import main


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:x", "tpu", ""])
def test_an_unknown_device_is_one_line_listing_the_valid_ones(family, tmp_path, device):
    recipe = write_recipe(tmp_path / "r.yaml", expo_recipe(family["sft"], family["dpo"], tmp_path / "out"))
    r = CliRunner().invoke(main, ["apply", str(recipe), "--device", device])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "use auto, cpu, cuda or cuda:N" in r.output and not (tmp_path / "out").exists()


def test_the_output_path_may_be_positional_as_in_mergekit_yaml(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", expo_recipe(family["sft"], family["dpo"], tmp_path / "from-recipe"))
    r = CliRunner().invoke(main, ["apply", str(recipe), str(tmp_path / "positional")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "positional" / "weightx.json").is_file() and not (tmp_path / "from-recipe").exists()
    plan = CliRunner().invoke(main, ["plan", str(recipe), str(tmp_path / "p2")])
    assert plan.exit_code == 0 and str(tmp_path / "p2") in plan.output
    both = CliRunner().invoke(main, ["apply", str(recipe), str(tmp_path / "a"), "--output", str(tmp_path / "b")])
    assert both.exit_code == 2 and "two output paths" in both.output


@pytest.mark.slow
def test_a_recipe_from_a_pipe_is_read_once(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", expo_recipe(family["sft"], family["dpo"], tmp_path / "out"))
    p = subprocess.run(["bash", "-c", f'"{sys.executable}" -m weightx apply <(cat "{recipe}")'], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "weightx.json").is_file()


def test_distillation_reports_its_steps_and_loss(family, tmp_path):
    import weightx
    from weightx.testing import default_corpus

    doc = expo_recipe(family["sft"], family["dpo"], tmp_path / "out")
    doc["deltas"][0]["edits"] = [{"bitdelta": {"distill": {"data": str(default_corpus()), "steps": 4, "batch_size": 2, "max_length": 32}}}]
    lines: list[str] = []
    weightx.apply(doc, report=lambda event, value: lines.append(value) if event == "log" else None)
    steps = [line for line in lines if line.startswith("distill: step")]
    assert [s.split(",")[0] for s in steps] == [f"distill: step {k}/4" for k in (1, 2, 3, 4)]
    assert any(" -> " in line and "logit MSE" in line for line in lines)


@pytest.mark.slow
def test_validation_prints_one_line_per_model_not_lm_evals_bars(family, tmp_path):
    doc = expo_recipe(family["sft"], family["dpo"], tmp_path / "out")
    doc["validate"] = {"tasks": ["weightx_mc"], "limit": 2, "compare": ["dpo"]}
    p = subprocess.run([sys.executable, "-m", "weightx", "apply", str(write_recipe(tmp_path / "r.yaml", doc))],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "evaluating output on weightx_mc, 2 examples each" in p.stderr and "evaluating dpo on" in p.stderr
    assert "Running loglikelihood requests" not in p.stderr and "fatal:" not in p.stderr, p.stderr
    verbose = subprocess.run([sys.executable, "-m", "weightx", "--verbose", "apply", str(tmp_path / "r.yaml"), "--overwrite"],
                             capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0 and "Running loglikelihood requests" in verbose.stderr


def test_a_sweep_within_the_standard_error_says_so():
    from weightx.recipe.sweep import Sweep, SweepParam
    from weightx.validate.sweep import Candidate, SweepOutcome
    from weightx.validate.table import render_sweep

    param = SweepParam(("deltas", 0, "edits", 0, "expo", "alpha"), "deltas.0.edits.0.expo.alpha", (0.1, 0.3, 0.5))
    scores = [(0.50, 0.02), (0.51, 0.02), (0.40, 0.01)]
    cands = [Candidate({param.label: a}, None, score=s, stderr=e) for a, (s, e) in zip(param.values, scores)]  # type: ignore[arg-type]
    outcome = SweepOutcome(Sweep([param], {}), "weightx_mc/acc", "max", cands, winner=1)
    text = render_sweep(outcome)
    assert outcome.within_noise() == [0] and outcome.as_record()["within_stderr"] == [0]
    assert "cannot tell them apart" in text and "within stderr" in text.splitlines()[3]
    header = text.splitlines()[1]
    assert header.split()[-1] == "choice"  # no untitled column
    clear = SweepOutcome(Sweep([param], {}), "weightx_mc/acc", "max",
                         [Candidate({param.label: a}, None, score=s, stderr=0.001) for a, s in zip(param.values, (0.3, 0.6, 0.4))], 1)  # type: ignore[arg-type]
    assert clear.within_noise() == [] and "cannot tell" not in render_sweep(clear)


@pytest.mark.slow
def test_a_hub_task_without_network_fails_at_once_saying_so(tmp_path):
    """No HF_HUB_OFFLINE: one look at the network instead of ~30 s of dataset retries."""
    import os
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update({"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens there
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "weightx", "eval", str(tmp_path), "--tasks", "arc_easy"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "unreachable" in p.stderr and "127.0.0.1:9 did not answer" in p.stderr
    assert time.perf_counter() - t0 < 90


def test_relative_model_paths_are_the_recipes_never_the_working_directorys(family, tmp_path, monkeypatch):
    import shutil

    import weightx

    recipe_dir, cwd = tmp_path / "recipes", tmp_path / "cwd"
    for root, which in ((recipe_dir, "dpo"), (cwd, "sft")):  # the same relative name in both places
        (root / "models").mkdir(parents=True)
        shutil.copytree(family[which], root / "models" / "ft")
    doc = {"models": {"sft": str(family["sft"]), "dpo": "models/ft"}, "base": "sft", "deltas": [{"model": "dpo"}],
           "output": {"path": "out"}}
    recipe = write_recipe(recipe_dir / "r.yaml", doc)
    monkeypatch.chdir(cwd)
    plan = weightx.plan(str(recipe))
    assert plan.sources["dpo"].root == (recipe_dir / "models" / "ft").resolve()
    assert plan.out_path == (cwd / "out").resolve()  # outputs, like mergekit's, are the working directory's
    r = CliRunner().invoke(main, ["plan", str(recipe)])
    assert str((recipe_dir / "models" / "ft").resolve()) in r.output
    shutil.rmtree(recipe_dir / "models")
    r = CliRunner().invoke(main, ["plan", str(recipe)])
    assert r.exit_code == 1 and f"no folder at {recipe_dir / 'models' / 'ft'}" in r.output


def test_a_loaded_recipe_object_keeps_its_folder_for_relative_paths(tmp_path, monkeypatch):
    """The README's Python example: Recipe.load, then apply from anywhere."""
    from pathlib import Path

    import weightx

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    recipe = weightx.Recipe.load(repo / "recipes" / "quickstart.yaml")
    assert recipe.folder == repo / "recipes"
    result = weightx.apply(recipe, output=tmp_path / "x", overwrite=True)
    assert (result.path / "weightx.json").is_file()
    again = weightx.plan(recipe, overrides=["deltas.0.edits.0.expo.alpha=0.5"])  # overrides keep the folder too
    assert again.sources["sft"].root == (repo / "examples" / "tiny" / "sft").resolve()


def test_a_single_shard_output_is_named_as_transformers_names_it(family, tmp_path):
    import json

    import weightx

    one = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "one")).path
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"]
    # the index stays (DESIGN.md's output layout has it in every output) and names that file
    assert set(json.loads((one / "model.safetensors.index.json").read_text())["weight_map"].values()) == {"model.safetensors"}
    many = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "many", shard_size="100KB")).path
    names = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(names) > 1 and all(n.startswith("model-") and f"-of-{len(names):05d}" in n for n in names)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(one) is not None
