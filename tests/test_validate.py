"""The validate block on the bundled tiny example: local tasks, tables, weightx.json, gates, weightx eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from weightx.cli import main
from weightx.testing import REPO_ROOT
from weightx.validate.table import fmt

TINY = REPO_ROOT / "examples" / "tiny"
TASKS = ["weightx_mc", "weightx_gen", "weightx_ppl"]
LIMIT = 6


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_recipe(folder: Path, **validate) -> Path:
    doc = {
        "name": "tiny-expo-validated",
        "models": {"sft": str(TINY / "sft"), "dpo": str(TINY / "dpo")},
        "base": "sft",
        "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": 0.3}}]}],
        "output": {"path": str(folder / "out"), "dtype": "bfloat16", "config_from": "dpo"},
        "validate": {"tasks": TASKS, "limit": LIMIT, "batch_size": 4, "compare": ["dpo"], **validate},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def lm_eval_direct(path: Path, task_names: list[str]) -> dict:
    """lm-eval's own numbers: simple_evaluate loading the folder itself (model="hf")."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from weightx.validate.tasks import bundled_configs

    return simple_evaluate(model="hf", model_args={"pretrained": str(path), "dtype": "float32"},
                           tasks=[bundled_configs()[t] for t in task_names], task_manager=TaskManager(include_defaults=False),
                           limit=LIMIT, batch_size=4, device="cpu", log_samples=False)


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """One apply with a validate block (three local tasks, compare dpo, two passing gates)."""
    folder = tmp_path_factory.mktemp("validated")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    recipe = write_recipe(folder, require={"weightx_mc/acc": ">= dpo - 1", "weightx_ppl/bits_per_byte": "< 100"})
    result = run("apply", str(recipe))
    return folder / "out", result


@pytest.mark.slow
def test_validate_runs_local_tasks_on_output_and_compare(validated):
    out, result = validated
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "weightx.json").read_text())
    v = doc["validation"]
    assert v["passed"] is True
    assert set(v["results"]) == {"output", "dpo"}
    for label in ("output", "dpo"):
        r = v["results"][label]
        assert set(r) == set(TASKS)
        assert set(r["weightx_mc"]) == {"acc", "acc_norm"}
        assert set(r["weightx_gen"]) == {"exact_match"}
        assert set(r["weightx_ppl"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert [g["passed"] for g in v["gates"]] == [True, True]
    assert v["settings"]["limit"] == LIMIT and v["settings"]["dtype"] == "float32"
    # The table comes last, one column per model, compared inputs first.
    table = result.output[result.output.index("validation (lm-eval"):]
    header = table.splitlines()[1].split()
    assert header == ["task", "metric", "dpo", "output"]
    assert table.rstrip().endswith("validation passed")


@pytest.mark.slow
def test_table_and_record_agree_with_lm_eval_itself(validated):
    out, result = validated
    doc = json.loads((out / "weightx.json").read_text())
    mine = doc["validation"]["results"]["output"]
    raw = lm_eval_direct(out, TASKS)
    checked = 0
    for task in TASKS:
        for key, value in raw["results"][task].items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",")
            entry = mine[task][metric]
            assert entry["value"] == value, (task, metric)
            se = raw["results"][task][f"{metric}_stderr,{filt}"]
            assert entry["stderr"] == (None if se == "N/A" else se)
            row = next(line for line in result.output.splitlines() if line.startswith(task) and f" {metric} " in line)
            assert row.rstrip().endswith(fmt(value, entry["stderr"]))
            checked += 1
    assert checked == 6


def test_card_shows_the_results(validated):
    out, _ = validated
    card = (out / "README.md").read_text()
    assert "## Validation" in card and "**passed**" in card
    assert "model-index" in card  # the Hub's eval-results metadata
    acc = json.loads((out / "weightx.json").read_text())["validation"]["results"]["output"]["weightx_mc"]["acc"]["value"]
    assert f"value: {acc}" in card


@pytest.mark.slow
def test_failing_gate_exits_1_names_the_gate_and_keeps_the_output(tmp_path):
    recipe = write_recipe(tmp_path, tasks=["weightx_mc"], limit=4, require={"weightx_mc/acc": ">= dpo + 2"})
    result = CliRunner().invoke(main, ["apply", str(recipe)])
    assert result.exit_code == 1
    err = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert "gate weightx_mc/acc" in err[0] and ">= dpo + 2" in err[0] and "failed" in err[0]
    out = tmp_path / "out"
    doc = json.loads((out / "weightx.json").read_text())
    v = doc["validation"]
    acc, dpo = v["results"]["output"]["weightx_mc"]["acc"]["value"], v["results"]["dpo"]["weightx_mc"]["acc"]["value"]
    assert f"output = {acc:.4g} is not >= {dpo + 2:.4g}" in err[0]
    assert v["passed"] is False and v["gates"][0]["passed"] is False
    assert any(out.glob("*.safetensors"))  # the output stays on disk...
    assert "**FAILED**" in (out / "README.md").read_text()
    from weightx.errors import WeightxError
    from weightx.publish import check_validation

    with pytest.raises(WeightxError):  # ...and is never pushed
        check_validation(doc, force=False)


def test_no_validate_skips_it(tmp_path):
    recipe = write_recipe(tmp_path, require={"weightx_mc/acc": ">= dpo + 2"})
    result = run("apply", str(recipe), "--no-validate")
    assert result.exit_code == 0, result.output
    assert "validation" not in json.loads((tmp_path / "out" / "weightx.json").read_text())


@pytest.mark.slow
def test_weightx_eval_with_compare_and_local_task_yaml(tmp_path, monkeypatch):
    # A user's own task file, given by path, with its data next to it; run from an unrelated directory.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "colors.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in
                                                [("Snow is", 0), ("Grass is", 1), ("The sky is", 2), ("Coal is", 3)]))
    (tasks / "colors.yaml").write_text(yaml.safe_dump({
        "task": "my_colors", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "colors.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": ["white", "green", "blue", "black"],
        "doc_to_target": "{{a}}", "metric_list": [{"metric": "acc"}]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run("eval", str(TINY / "dpo"), "--tasks", f"weightx_ppl,{tasks / 'colors.yaml'}", "--limit", "4",
                 "--batch-size", "4", "--compare", str(TINY / "sft"), "--json", "res.json")
    assert result.exit_code == 0, result.output
    header = result.output[result.output.index("validation (lm-eval"):].splitlines()[1].split()
    assert header == ["task", "metric", "sft", "dpo"]
    rec = json.loads((elsewhere / "res.json").read_text())
    assert set(rec["results"]) == {"sft", "dpo"}
    assert set(rec["results"]["dpo"]) == {"weightx_ppl", "my_colors"}
    assert rec["passed"] is True and rec["gates"] == []
    # A folder of task YAMLs works too.
    result = run("eval", str(TINY / "dpo"), "--tasks", str(tasks), "--limit", "2")
    assert result.exit_code == 0, result.output
    assert "my_colors" in result.output


@pytest.mark.slow
def test_unknown_task_is_one_line_with_a_suggestion(tmp_path):
    result = CliRunner().invoke(main, ["eval", str(TINY / "dpo"), "--tasks", "weightx_smokee"])
    assert result.exit_code == 2
    assert "weightx_smoke" in result.output and "did you mean" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_builtin_task_offline_fails_fast_in_one_line(tmp_path):
    """With HF_HUB_OFFLINE=1 a Hub task fails on its first attempt, naming the task; no retries."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    recipe = write_recipe(tmp_path, tasks=["arc_easy"])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "weightx", "apply", str(recipe)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stderr
    assert not (tmp_path / "out").exists()  # the tasks are checked before anything is computed
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "arc_easy" in errors[0] and "local task" in errors[0] and "go online" in errors[0]
    # Most of this is lm-eval indexing its ~15k built-in task YAMLs (~10 s on an idle 2-core machine);
    # 40 s of download retries on top would break the bound.
    assert seconds < 90, seconds


def test_bundled_tasks_have_absolute_data_paths_and_smoke_group(tmp_path, monkeypatch):
    from weightx.validate.tasks import BUNDLED, bundled_configs, load_tasks, resolve_tasks

    monkeypatch.chdir(tmp_path)
    for name, cfg in bundled_configs().items():
        files = cfg["dataset_kwargs"]["data_files"]["test"]
        assert Path(files).is_absolute() and Path(files).is_file(), name
    loaded = load_tasks(resolve_tasks(["weightx_smoke"]))
    assert set(loaded.tasks) == set(BUNDLED[:3])
    assert list(loaded.groups) == ["weightx_smoke"]
    sizes = {n: len(t.eval_docs) for n, t in loaded.tasks.items()}
    assert sizes == {"weightx_mc": 40, "weightx_gen": 30, "weightx_ppl": 10}


@pytest.mark.slow
def test_python_api_validates_and_raises_on_a_failed_gate(tmp_path):
    import weightx
    from weightx.errors import GateFailed

    data = yaml.safe_load(write_recipe(tmp_path, tasks=["weightx_ppl"], limit=2, compare=[],
                                       require={"weightx_ppl/bits_per_byte": "< 100"}).read_text())
    result = weightx.apply(data)
    assert result.extra["validation"]["passed"] is True
    assert set(result.extra["validation"]["results"]["output"]) == {"weightx_ppl"}
    data["validate"]["require"] = {"weightx_ppl/bits_per_byte": "< 0"}
    with pytest.raises(GateFailed) as e:
        weightx.apply(data, overwrite=True)
    assert e.value.validation.passed is False and e.value.exit_code == 1
    # the gate is decided before the swap: the previous (passing) output stays, the candidate is kept beside it
    assert json.loads((tmp_path / "out" / "weightx.json").read_text())["validation"]["passed"] is True
    assert json.loads((tmp_path / "out.rejected" / "weightx.json").read_text())["validation"]["passed"] is False
