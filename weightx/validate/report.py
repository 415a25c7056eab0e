"""Validate a finished output (and the compared inputs), check the gates, record it all.

The record goes into the output's `weightx.json` under `validation` (and `sweep`), with the schema

    validation.results[label][task][metric] = {"value": x, "stderr": y}      # label: "output" or an alias
    validation.passed = all gates passed (true when there are none)

and the model card is re-rendered from it. weightx.json is rewritten atomically (temp file +
os.replace), so the folder always holds a complete record; a failed gate leaves the output on disk
with `validation.passed: false`, which `weightx push` refuses to publish.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from weightx.errors import GateFailed, InputError, UsageError
from weightx.io.sources import resolve
from weightx.pipeline.card import refresh_card
from weightx.pipeline.record import portable
from weightx.recipe.model import Recipe
from weightx.recipe.gates import GateResult, check, parse_gate
from weightx.validate.runner import EvalSettings, evaluate, load_model, settings_for, stored_dtype, summarize, task_order, torch_device, torch_dtype
from weightx.validate.sweep import run_sweep
from weightx.validate.tasks import load_tasks, resolve_tasks

if TYPE_CHECKING:
    from weightx.pipeline.plan import Plan
    from weightx.validate.sweep import SweepOutcome
    from weightx.validate.tasks import LoadedTasks


def gate_failed(validation: "Validation", path: Path | None = None, previous: Path | None = None) -> GateFailed:
    """The error for a failed `require` gate. The candidate is kept, marked `validation.passed: false`:
    as the output when there was none, else beside the `previous` output, which is left untouched."""
    failed = "; ".join(g.message(validation.output_label) for g in validation.gates if not g.passed)
    where = f"; {path} is kept but marked validation.passed=false in weightx.json, so it will not be pushed" if path else ""
    if previous is not None:
        where = (f"; the previous output {previous} is unchanged; the candidate is kept beside it at {path}, marked"
                 " validation.passed=false in weightx.json, so it will not be pushed")
    err = GateFailed(f"validation failed: {failed}{where}")
    err.validation = validation  # type: ignore[attr-defined]
    return err


@dataclass
class Validation:
    tasks: list[str]
    settings: EvalSettings
    order: list[str]  # task rows
    labels: list[str]  # columns: compared inputs, then the output
    models: dict[str, str]  # label -> where it was read from
    results: dict[str, dict[str, dict[str, dict]]] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    output_label: str = "output"
    reused: bool = False  # output results taken from the sweep's in-memory evaluation
    seconds: float = 0.0
    lm_eval_version: str = ""

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def as_record(self) -> dict:
        return {
            "passed": self.passed,
            "tasks": self.tasks,
            "settings": {**self.settings.as_dict(), "device": self.device, "dtype": self.dtype},
            "models": self.models,
            "results": self.results,
            "higher_is_better": self.higher_is_better,
            "gates": [g.as_dict() for g in self.gates],
            "output_from_sweep": self.reused,
            "lm_eval_version": self.lm_eval_version,
            "seconds": round(self.seconds, 3),
        }


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:  # pragma: no cover
        return "?"


def evaluate_models(
    models: dict[str, Path],
    tasks: "LoadedTasks",
    settings: EvalSettings,
    *,
    task_names: list[str],
    preset: dict[str, tuple[dict, dict]] | None = None,
    output_label: str = "output",
    log: Callable[[str], None] = lambda m: None,
) -> Validation:
    """Evaluate each model folder (label -> path); `preset` supplies results already measured."""
    import torch

    t0 = time.perf_counter()
    v = Validation(task_names, settings, task_order(tasks), list(models), {k: str(p) for k, p in models.items()},
                   output_label=output_label, lm_eval_version=_lm_eval_version())
    v.device = str(torch_device(settings))
    main = Path(models.get(output_label) or next(iter(models.values())))
    v.dtype = str(torch_dtype(settings, stored_dtype(main))).removeprefix("torch.")
    for label, path in models.items():
        if preset and label in preset:
            v.results[label], hib = preset[label]
            v.reused = True
        else:
            t1 = time.perf_counter()
            log(f"evaluating {label} on {', '.join(task_order(tasks))}" + (f", {settings.limit} examples each" if settings.limit else ""))
            model, tokenizer = load_model(path, settings)
            v.results[label], hib = summarize(evaluate(model, tokenizer, tasks, settings))
            del model
            log(f"evaluated {label} ({time.perf_counter() - t1:.1f} s)")
        for task, flags in hib.items():
            v.higher_is_better.setdefault(task, {}).update(flags)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    v.seconds = time.perf_counter() - t0
    return v


def compare_paths(aliases: list[str], recipe: Recipe, recipe_dir: Path | None) -> dict[str, Path]:
    """The folders of the compared inputs (resolved like any model source)."""
    out = {}
    for alias in aliases:
        src = resolve(alias, recipe.models[alias], recipe_dir)
        if src.kind == "file" or not src.has_config:
            raise InputError(f"validate.compare: '{alias}' ({src.describe()}) has no config.json next to its weights, so lm-eval cannot load it; compare a full model folder")
        out[alias] = src.root
    return out


def write_record(folder: Path, validation: Validation, sweep: "SweepOutcome | None" = None) -> dict:
    """Add the validation (and sweep) to `folder/weightx.json` atomically, then refresh the card."""
    path = folder / "weightx.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["validation"] = portable(validation.as_record())  # no local paths of compared models or tasks
    if sweep is not None:
        doc["sweep"] = portable(sweep.as_record())
    tmp = folder / f".weightx.json.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        refresh_card(folder)
    except (ImportError, OSError, ValueError):  # the card is a convenience; weightx.json is the record
        pass
    return doc


def validate_output(
    plan: "Plan",
    *,
    path: Path | None = None,
    recipe_dir: Path | None = None,
    device: str = "auto",
    sweep: "SweepOutcome | None" = None,
    tasks: "LoadedTasks | None" = None,
    log: Callable[[str], None] = lambda m: None,
) -> Validation:
    """Run the recipe's validate block on the written output; record it; return it (check `.passed`)."""
    spec = plan.recipe.validate_
    if spec is None:
        raise ValueError("the recipe has no validate block")
    out = Path(path or plan.out_path)
    settings = settings_for(spec, device)
    tasks = tasks or load_tasks(resolve_tasks(spec.tasks, recipe_dir, spec.allow_code_tasks))
    models = {**compare_paths(spec.compare, plan.recipe, recipe_dir), "output": out}
    preset = None
    if sweep is not None:
        # The winner was measured in memory on the select task; reuse that only if it covers every task.
        if set(task_order(tasks)) <= set(sweep.best.results):
            preset = {"output": (sweep.best.results, sweep.best.higher_is_better)}
    v = evaluate_models(models, tasks, settings, task_names=list(spec.tasks), preset=preset, log=log)
    v.gates = check([parse_gate(k, e) for k, e in spec.require.items()], v.results)
    write_record(out, v, sweep)
    return v


def run_recipe_sweep(
    recipe: Recipe,
    *,
    output: str | Path | None = None,
    recipe_dir: Path | None = None,
    device: str = "auto",
    validate: bool = True,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[Any, "SweepOutcome", "LoadedTasks"]:
    """Evaluate a recipe's sweep in memory; return (the winner's scalar recipe, the outcome, the tasks)."""
    if not validate:
        p = recipe.sweep.params[0]
        raise UsageError(f"{recipe.sweep.describe()}; picking the winner needs evaluation: drop --no-validate,"
                         f" or run one value (e.g. --set {p.label}={p.values[0]})")
    tasks = load_tasks(resolve_tasks(recipe.validate_.tasks, recipe_dir, recipe.validate_.allow_code_tasks))
    outcome = run_sweep(recipe, output=output, recipe_dir=recipe_dir, device=device, tasks=tasks, log=log)
    return outcome.best.recipe, outcome, tasks


def _model_dir(spec: str, what: str) -> Path:
    folder = Path(spec).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists():
        return folder.resolve()  # a LoRA adapter (format: lora): evaluated on its base, merged
    src = resolve(what, spec)
    if src.kind == "file" or not src.has_config:
        raise InputError(f"{spec}: lm-eval needs a model folder with config.json and a tokenizer, not just weights")
    return src.root


def evaluate_paths(
    path: str,
    *,
    compare: list[str],
    tasks: list[str],
    settings: EvalSettings,
    log: Callable[[str], None] = lambda m: None,
    allow_code: bool = False,
) -> Validation:
    """`weightx eval`: evaluate a checkpoint (and others side by side); columns are named after the folders."""
    if not tasks:
        raise UsageError("--tasks is empty; name at least one task, e.g. --tasks weightx_smoke")
    loaded = load_tasks(resolve_tasks(tasks, Path.cwd(), allow_code))
    models: dict[str, Path] = {}
    for spec in [*compare, path]:
        root = _model_dir(spec, "eval")
        label = base = root.name
        k = 2
        while label in models:
            label, k = f"{base}#{k}", k + 1
        models[label] = root
    return evaluate_models(models, loaded, settings, task_names=tasks, output_label=label, log=log)
