"""The Python API: `weightx.apply(recipe)`, `weightx.plan(recipe)` and what the CLI shows.

`apply` is the one implementation of a run: sweep, plan, tasks, execute, validate, gate, push.
The `weightx apply` command is a thin wrapper that passes a `report` callback and prints what it is
told; the text renderers it uses are re-exported here so the CLI imports this module only.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from weightx.diff import diff, plot as plot_diff, render as render_diff
from weightx.direction import direction_hint, render_direction
from weightx.errors import WeightxError
from weightx.inspect import inspect_source
from weightx.io.verify import render_verify, verify
from weightx.pipeline.plan import Plan, human_bytes
from weightx.pipeline.planner import build_plan, render_plan
from weightx.pipeline.run import ApplyResult, execute
from weightx.publish import push, push_spec, render_dry_run, render_push
from weightx.recipe.model import Recipe, load_recipe
from weightx.validate.report import evaluate_paths, gate_failed, run_recipe_sweep, validate_output
from weightx.validate.runner import EvalSettings
from weightx.validate.table import render_sweep, render_validation
from weightx.validate.tasks import load_tasks, resolve_tasks

# What `apply` reports as it goes, to a `report(event, value)` callback:
#   "log" (str: a progress line), "sweep" (the sweep's outcome), "written" (ApplyResult),
#   "validation" (the validation, before a failed gate raises), "push" (PushResult).
Report = Callable[[str, Any], None]


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone validates and publishes


def apply(
    recipe: Recipe | str | Path | dict,
    *,
    output: str | Path | None = None,
    device: str = "auto",
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool = False,
    progress: bool | None = False,
    push: bool = True,
    validate: bool = True,
    report: Report | None = None,
) -> ApplyResult:
    """Run a recipe (object, YAML path or dict) and return where the output went and its stats.

    With a `validate:` block the output is then evaluated (`validate=False` skips it; a list-valued
    parameter is a sweep, evaluated in memory before only the winner is written); `result.extra`
    gets "validation" (and "sweep"), and a failed gate raises `GateFailed` with the output kept.
    With a `push:` block the output is then published to the Hub (`push=False` skips it)."""
    say: Report = report or (lambda event, value: None)
    log = lambda message: say("log", message)  # noqa: E731
    r = load_recipe(recipe, overrides)
    recipe_dir = r.folder  # relative paths start at the recipe file's folder (a dict or a pipe: the cwd)
    sweep = tasks = None
    if r.sweep is not None:  # evaluate every candidate in memory; only the winner is written
        r, sweep, tasks = run_recipe_sweep(r, output=output, recipe_dir=recipe_dir, device=device, validate=validate, log=log)
        say("sweep", sweep)
    plan = build_plan(r, output, recipe_dir)
    validating = validate and r.validate_ is not None and _main_rank()
    if validating and tasks is None:
        # An unknown task or one whose data is offline stops the run before any compute.
        tasks = load_tasks(resolve_tasks(r.validate_.tasks, recipe_dir, r.validate_.allow_code_tasks))
    validation = []

    def accept(candidate: Path) -> bool:  # runs on the complete candidate, before it replaces anything
        validation.append(validate_output(plan, path=candidate, recipe_dir=recipe_dir, device=device, sweep=sweep,
                                          tasks=tasks, log=log))
        return validation[-1].passed

    result = execute(plan, device=device, overwrite=overwrite, progress=progress, accept=accept if validating else None, log=log)
    if not _main_rank():
        return result
    say("written", result)
    if validation:
        v = validation[-1]
        result.extra["validation"] = v.as_record()
        if sweep is not None:
            result.extra["sweep"] = sweep.as_record()
        say("validation", v)
        if not v.passed:
            raise gate_failed(v, result.path, previous=plan.out_path if result.extra.get("rejected") else None)
    if push and r.push is not None:  # keep last: publish only after apply (and validation) succeeded
        pushed = push_spec(result.path, r.push, log=log)
        result.extra["push"] = pushed.as_dict()
        say("push", pushed)
    return result


def plan(recipe: Recipe | str | Path | dict, *, output: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """Resolve the inputs and build the plan from their headers; nothing is computed or written."""
    r = load_recipe(recipe, overrides)
    return build_plan(r, output, r.folder)


def describe_plan(recipe: Recipe | str | Path | dict, *, output: str | Path | None = None,
                  overrides: list[str] | tuple[str, ...] = (), explain: bool = False) -> str:
    """`weightx plan`: the plan as text, with the sweep it stands for (`explain`: and the recipe
    as native YAML, e.g. what a mergekit config was read as)."""
    r = load_recipe(recipe, overrides)
    text = render_plan(build_plan(r, output, r.folder))
    text += f"\n{r.sweep.describe()}" if r.sweep is not None else ""
    if explain:
        import yaml

        text += "\n\n# the native weightx recipe:\n" + yaml.safe_dump(r.recipe_form(), sort_keys=False, allow_unicode=True)
    return text


def read_weightx_json(path: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((path / "weightx.json").read_text(encoding="utf-8"))
    return None


__all__ = [
    "ApplyResult", "EvalSettings", "Plan", "Recipe", "Report", "WeightxError", "apply", "describe_plan", "evaluate_paths",
    "execute", "human_bytes", "inspect_source", "plan", "push", "read_weightx_json", "render_dry_run", "render_push",
    "render_sweep", "render_validation", "render_verify", "verify",
]


def diff_models(paths: list[str], *, rank: bool = False, as_json: bool = False, per_tensor: bool = False,
                plot: str | Path | None = None, direction: str | Path | None = None) -> str:
    """`weightx diff`: the deltas' statistics as a table (or JSON); optionally a PNG plot and the
    extrapolation direction hint (`weightx.diff_direction`) on a text file."""
    doc = diff(list(paths), rank=rank)
    if direction is not None:
        doc["direction"] = direction_hint(paths[0], paths[1:], Path(direction))
    if plot is not None:
        plot_diff(doc, Path(plot))
    if as_json:
        return json.dumps(doc, indent=2)
    text = render_diff(doc, per_tensor)
    if direction is not None:
        text += "\n" + render_direction(doc["direction"])
    return text
