"""Gates: `require: {task/metric: ">= dpo - 0.01"}` and the sweep's `select: task/metric`.

A gate compares the output's metric with a number, or with a compared input's value of the same
metric plus or minus a margin. Parsing is pure (no lm-eval, no torch) so the recipe can check
every gate when it is loaded.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_GATE = re.compile(rf"^\s*(>=|<=|==|!=|>|<)\s*(?:(?P<num>{_NUM})|(?P<ref>[A-Za-z_][\w.\-]*)\s*(?:(?P<sign>[-+])\s*(?P<off>{_NUM}))?)\s*$")
EXAMPLE = 'e.g. ">= 0.5", ">= dpo - 0.01" or "<= sft"'


def split_key(key: str) -> tuple[str, str]:
    """'task/metric' → (task, metric). Task names may hold slashes (paths); the metric never does."""
    task, sep, metric = key.rpartition("/")
    if not sep or not task or not metric:
        raise ValueError(f"{key!r} is not task/metric (e.g. weightx_mc/acc)")
    return task, metric


@dataclass(frozen=True)
class _Keyed:
    """Something addressed by a `task/metric` key."""

    key: str  # task/metric as written

    @property
    def task(self) -> str:
        return split_key(self.key)[0]

    @property
    def metric(self) -> str:
        return split_key(self.key)[1]


@dataclass(frozen=True)
class Gate(_Keyed):
    op: str
    ref: str | None  # a compared alias, or None for a plain number
    offset: float  # the number (ref None) or the margin added to the alias's value

    @property
    def text(self) -> str:
        if self.ref is None:
            return f"{self.op} {self.offset:g}"
        if self.offset == 0:
            return f"{self.op} {self.ref}"
        return f"{self.op} {self.ref} {'-' if self.offset < 0 else '+'} {abs(self.offset):g}"


def parse_gate(key: str, expr: Any) -> Gate:
    split_key(key)
    if isinstance(expr, (int, float)) and not isinstance(expr, bool):
        return Gate(key, ">=", None, float(expr))  # a bare number means "at least"
    m = _GATE.match(expr) if isinstance(expr, str) else None
    if not m:
        raise ValueError(f"{expr!r} is not a condition; write an operator and a number or a compared alias, {EXAMPLE}")
    if m["num"] is not None:
        return Gate(key, m[1], None, float(m["num"]))
    off = float(m["off"]) if m["off"] is not None else 0.0
    return Gate(key, m[1], m["ref"], -off if m["sign"] == "-" else off)


def lookup(results: dict[str, dict[str, dict]], task: str, metric: str) -> dict | None:
    """The entry for task/metric; `metric` may also be lm-eval's "metric,filter" form."""
    metrics = results.get(task)
    if not metrics:
        return None
    if metric in metrics:
        return metrics[metric]
    name, _, filt = metric.partition(",")
    entry = metrics.get(name)
    if entry is not None and filt and entry.get("filter", "none") == filt:
        return entry
    return None


def available(results: dict[str, dict[str, dict]], task: str) -> str:
    if task not in results:
        return f"tasks evaluated: {', '.join(results) or 'none'}"
    return f"{task} has: {', '.join(results[task]) or 'no metrics'}"


@dataclass
class GateResult:
    gate: Gate
    passed: bool
    value: float | None = None
    threshold: float | None = None
    ref_value: float | None = None
    problem: str | None = None  # why it could not be checked

    def message(self, label: str = "output") -> str:
        g = self.gate
        if self.problem:
            return f"gate {g.key} \"{g.text}\" cannot be checked: {self.problem}"
        verdict = "passed" if self.passed else "failed"
        rel = "" if self.passed else " is not"
        ref = "" if g.ref is None else f" ({g.ref} = {self.ref_value:.4g}{'' if g.offset == 0 else f' {g.offset:+g}'})"
        return f"gate {g.key} \"{g.text}\" {verdict}: {label} = {self.value:.4g}{rel} {g.op} {self.threshold:.4g}{ref}"

    def as_dict(self) -> dict:
        return {"gate": self.gate.key, "condition": self.gate.text, "passed": self.passed, "value": self.value,
                "threshold": self.threshold, "reference": self.gate.ref, "reference_value": self.ref_value,
                **({"problem": self.problem} if self.problem else {})}


def check(gates: list[Gate], results: dict[str, dict[str, dict[str, dict]]], output: str = "output") -> list[GateResult]:
    """Check each gate against `results[label][task][metric]`; `output` is the label under test."""
    out = []
    for g in gates:
        mine = lookup(results.get(output, {}), g.task, g.metric)
        if mine is None:
            out.append(GateResult(g, False, problem=f"{output} has no {g.metric!r} for task {g.task!r} ({available(results.get(output, {}), g.task)})"))
            continue
        ref_value = None
        if g.ref is not None:
            theirs = lookup(results.get(g.ref, {}), g.task, g.metric)
            if theirs is None:
                out.append(GateResult(g, False, mine["value"], problem=f"{g.ref!r} has no {g.metric!r} for task {g.task!r} (is it in validate.compare?)"))
                continue
            ref_value = theirs["value"]
            threshold = ref_value + g.offset
        else:
            threshold = g.offset
        value = mine["value"]
        passed = bool(OPS[g.op](value, threshold)) and math.isfinite(value)
        out.append(GateResult(g, passed, value, threshold, ref_value))
    return out


@dataclass(frozen=True)
class Selector(_Keyed):
    """`select: [max|min] task/metric`: the sweep keeps the candidate with the best value."""

    direction: str | None  # "max" / "min", or None: lm-eval's higher_is_better for that metric


def parse_select(text: str) -> Selector:
    parts = text.split()
    direction = None
    if len(parts) == 2 and parts[0] in ("max", "min"):
        direction, text = parts
    elif len(parts) != 1:
        raise ValueError(f"{text!r}: write task/metric, optionally after max or min (e.g. weightx_mc/acc, min weightx_ppl/word_perplexity)")
    split_key(text)
    return Selector(text, direction)
