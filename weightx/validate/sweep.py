"""Choosing an edit's strength by evaluation: a parameter given as a list is a sweep.

    deltas:
      - model: dpo
        edits: [{expo: {alpha: [0.1, 0.3, 0.5]}}]
    validate: {tasks: [weightx_mc], select: weightx_mc/acc}

Every numeric list in an edit's parameters, a delta's `weight` or the combine's parameters is swept
(several lists: every combination). Each candidate is a plain scalar recipe. They are evaluated in
memory: the model is loaded once, and for each candidate every computed tensor is set to exactly
what `apply` would write (the engine's own `TensorComputer`, rounded to the output dtype), so the
winner, written afterwards by a normal apply, has the weights that were evaluated, bit for bit.
No checkpoint is written per candidate.


The grammar (finding lists, substituting candidates) is `weightx.recipe.sweep`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from weightx.errors import InputError, UsageError
from weightx.io.safetensors import DTYPES
from weightx.pipeline.compute import Inputs, TensorComputer, pick_device
from weightx.pipeline.plan import Plan
from weightx.pipeline.planner import build_plan
from weightx.recipe.gates import Selector, available, lookup, parse_select
from weightx.recipe.model import Recipe
from weightx.recipe.sweep import Sweep
from weightx.validate.runner import EvalSettings, evaluate, settings_for, summarize, torch_dtype
from weightx.validate.tasks import LoadedTasks, load_tasks, resolve_tasks





@dataclass
class Candidate:
    values: dict[str, float]
    recipe: "Recipe"
    results: dict[str, dict[str, dict]] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    score: float | None = None
    stderr: float | None = None
    seconds: float = 0.0


@dataclass
class SweepOutcome:
    sweep: Sweep
    select: str
    direction: str
    candidates: list[Candidate]
    winner: int
    seconds: float = 0.0

    @property
    def best(self) -> Candidate:
        return self.candidates[self.winner]

    def within_noise(self) -> list[int]:
        """The other candidates whose score is within a standard error of the winner's (either's),
        i.e. not clearly worse: the evaluation cannot tell them apart."""
        b = self.best
        if b.score is None:
            return []
        return [i for i, c in enumerate(self.candidates) if i != self.winner and c.score is not None
                and (err := max(b.stderr or 0.0, c.stderr or 0.0)) > 0 and abs(b.score - c.score) <= err]

    def as_record(self) -> dict:
        return {
            "select": self.select,
            "direction": self.direction,
            "parameters": {p.label: list(p.values) for p in self.sweep.params},
            "candidates": [{"values": c.values, "score": c.score, "stderr": c.stderr, "seconds": round(c.seconds, 3),
                            "results": c.results} for c in self.candidates],
            "winner": self.winner,
            "winner_values": self.best.values,
            "within_stderr": self.within_noise(),  # candidates the evaluation cannot tell from the winner
            "in_memory": True,
            "seconds": round(self.seconds, 3),
        }


def set_weights(model: Any, plan: Plan, device: torch.device | str) -> None:
    """Overwrite every computed tensor of `model` with what `apply` would write for `plan`.

    The values come from the engine's TensorComputer (fp32 math, one rounding to the output dtype),
    then are cast to the model's dtype, exactly as a model loaded from the written checkpoint is.
    """
    state = model.state_dict()  # shares storage with the parameters
    inputs = Inputs()
    computer = TensorComputer(plan, inputs, device)
    try:
        with torch.no_grad():
            for t in plan.tensors:
                if not t.edit:
                    continue  # copied from config_from, which is what the model was loaded from
                target = state.get(t.name)
                if target is None or tuple(target.shape) != tuple(t.shape):
                    raise InputError(
                        f"in-memory sweep: checkpoint tensor {t.name!r} has no parameter of that name and shape in the"
                        f" transformers model loaded from '{plan.recipe.config_from}'; sweep by separate runs instead"
                        " (one apply per value with --set)"
                    )
                blocks = list(computer.blocks(t))
                flat = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
                target.copy_(flat.view(target.shape))
    finally:
        inputs.close()


def select_tasks(tasks: "LoadedTasks", name: str) -> "LoadedTasks":
    """The part of `tasks` that `select` reads: that group or that task alone."""
    if name in tasks.groups:
        group = tasks.groups[name]
        subtasks = {t.task_name: t for t in group.get_all_tasks()}
        subgroups = {g.name: g for g in group.get_all_groups()} | {name: group}
        return LoadedTasks(tasks.manager, [group], subtasks, subgroups)
    if name in tasks.tasks:
        return LoadedTasks(tasks.manager, [tasks.tasks[name]], {name: tasks.tasks[name]}, {})
    known = ", ".join([*tasks.groups, *tasks.tasks])
    raise UsageError(f"validate.select: task {name!r} is not among validate.tasks (evaluated: {known})")


def _score(results: dict, higher: dict, select: Selector) -> tuple[float | None, float | None, bool | None]:
    entry = lookup(results, select.task, select.metric)
    if entry is None:
        return None, None, None
    name = select.metric.split(",")[0]
    return entry["value"], entry.get("stderr"), higher.get(select.task, {}).get(name)


def run_sweep(
    recipe: "Recipe",
    *,
    output: str | Path | None = None,
    recipe_dir: Path | None = None,
    device: str = "auto",
    tasks: "LoadedTasks | None" = None,
    settings: "EvalSettings | None" = None,
    log: Callable[[str], None] = lambda m: None,
) -> SweepOutcome:
    """Evaluate every candidate of `recipe`'s sweep in memory and pick the winner by `validate.select`."""

    t0 = time.perf_counter()
    sweep = recipe.sweep
    spec = recipe.validate_
    if sweep is None or spec is None or not spec.select:
        raise UsageError("not a sweep: give an edit parameter as a list and validate.select")
    select = parse_select(spec.select)
    settings = settings or settings_for(spec, device)
    if tasks is None:
        tasks = load_tasks(resolve_tasks(spec.tasks, recipe_dir, spec.allow_code_tasks))
    # Candidates are measured on the task that picks the winner only; the written output then gets
    # the full validate block (as ExPO picks alpha on one signal, then benchmarks the pick).
    judge = select_tasks(tasks, select.task)
    candidates = [Candidate(v, r) for v, r in sweep.candidates()]
    plans = [build_plan(c.recipe, output, recipe_dir) for c in candidates]  # headers only: all problems first
    first = plans[0]
    if not first.config_source.has_config:
        raise UsageError(f"a sweep evaluates the model in memory and needs config.json in '{first.recipe.config_from}' ({first.config_source.describe()})")
    out_dtypes = {t.out_dtype for t in first.tensors if t.edit}
    stored = DTYPES[next(iter(out_dtypes))] if len(out_dtypes) == 1 else None
    # The model is loaded once, from config_from (which supplies the tensors apply copies unchanged)
    # and in the dtype the written output would be evaluated in.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    eval_dtype = torch_dtype(settings, stored)
    model = AutoModelForCausalLM.from_pretrained(first.config_source.root, dtype=eval_dtype)
    model = model.to(pick_device(settings.device or "auto")).eval()
    tokenizer = AutoTokenizer.from_pretrained(first.config_source.root)
    compute = pick_device(device)
    direction = select.direction
    for i, (cand, plan) in enumerate(zip(candidates, plans)):
        t1 = time.perf_counter()
        set_weights(model, plan, compute)
        cand.results, cand.higher_is_better = summarize(evaluate(model, tokenizer, judge, settings))
        cand.score, cand.stderr, hib = _score(cand.results, cand.higher_is_better, select)
        if cand.score is None:
            raise UsageError(f"validate.select: {select.key} was not measured ({available(cand.results, select.task)})")
        direction = direction or ("min" if hib is False else "max")  # lm-eval's higher_is_better
        cand.seconds = time.perf_counter() - t1
        values = ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, (int, float)) else f"{k.split('.')[-1]}={v}"
                           for k, v in cand.values.items())
        log(f"sweep {i + 1}/{len(candidates)}: {values}: {select.key} = {cand.score:.4g} ({cand.seconds:.1f} s)")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    pick = max if direction == "max" else min
    # Ties go to the first candidate in the order given.
    winner = pick(range(len(candidates)), key=lambda i: (candidates[i].score, -i if direction == "max" else i))
    return SweepOutcome(sweep, select.key, direction, candidates, winner, time.perf_counter() - t0)
