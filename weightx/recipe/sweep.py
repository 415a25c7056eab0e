"""The sweep grammar: a numeric list in an edit's parameters, a delta's weight or the combine is a sweep.

Pure Python over raw recipe data: finding the lists, substituting one candidate's values, and the
checks that only make sense for a sweep. Running a sweep (evaluating candidates) is
`weightx.validate.sweep`.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

MAX_CANDIDATES = 64


def _numeric_list(v: Any) -> bool:
    # Any list of scalars counts (so `alpha: [0.1, "x"]` gets a located per-value error); only
    # include/exclude take lists of their own, and they are skipped by name.
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, (int, float, str)) for x in v)


@dataclass(frozen=True)
class SweepParam:
    raw_path: tuple  # where the list sits in the recipe data as written
    label: str  # canonical location, e.g. deltas.0.edits.0.expo.alpha
    values: tuple

    @property
    def short(self) -> str:
        """A column title: `expo.alpha`, `weight`, `ties.density` (with the delta index when ambiguous)."""
        parts = self.label.split(".")
        return ".".join(parts[-2:]) if parts[0] == "deltas" and len(parts) > 3 else parts[-1] if parts[0] == "deltas" else self.label


def _op_params(node: Any) -> tuple[str, dict, tuple] | None:
    """(op, params, path-to-params) for an edit/combine node written as {op: {..}} or {op: x, ..}."""
    if isinstance(node, dict) and len(node) == 1 and "op" not in node:
        (op, params), = node.items()
        if isinstance(params, dict):
            return str(op), params, (op,)
    if isinstance(node, dict) and "op" in node:
        return str(node["op"]), node, ()
    return None


def parameter_sites(data: dict) -> Iterator[tuple[tuple, str, Any]]:
    """(raw path, canonical label, value) of every parameter that may take a number, in recipe
    order: each delta's weight, each edit's parameters, the combine's. The sweep and the per-tensor
    grammar (`weightx.recipe.varying`) pick theirs from these."""
    deltas = data.get("deltas")
    for i, d in enumerate(deltas if isinstance(deltas, list) else []):
        if not isinstance(d, dict):
            continue
        if "weight" in d:
            yield ("deltas", i, "weight"), f"deltas.{i}.weight", d["weight"]
        edits = d.get("edits")
        for j, e in enumerate(edits if isinstance(edits, list) else []):
            got = _op_params(e)
            if got is None:
                continue
            op, params, sub = got
            for k, v in params.items():
                if k not in ("op", "include", "exclude"):
                    yield ("deltas", i, "edits", j, *sub, k), f"deltas.{i}.edits.{j}.{op}.{k}", v
    got = _op_params(data.get("combine"))
    if got is not None:
        op, params, sub = got
        for k, v in params.items():
            if k != "op":
                yield ("combine", *sub, k), f"combine.{op}.{k}", v


def find_params(data: dict) -> list[SweepParam]:
    """Every swept parameter in raw recipe data, in recipe order."""
    return [SweepParam(path, label, tuple(v)) for path, label, v in parameter_sites(data) if _numeric_list(v)]


def substitute(data: dict, params: list, values: Iterable[Any]) -> dict:
    """A deep copy of `data` with the setting at each parameter's `raw_path` replaced by one value
    (swept lists here, gradients and filters in `weightx.recipe.varying`)."""
    out = copy.deepcopy(data)
    for p, v in zip(params, values):
        node: Any = out
        for key in p.raw_path[:-1]:
            node = node[key]
        node[p.raw_path[-1]] = v
    return out


@dataclass
class Sweep:
    """The swept parameters of a recipe and the raw data they came from (after --set overrides)."""

    params: list[SweepParam]
    data: dict
    source: str = "recipe"
    # Validates one candidate's data as a scalar recipe (the recipe model passes its validator in,
    # so this grammar module never imports the model back).
    build: Callable[[dict, str], Any] | None = field(default=None, repr=False, compare=False)

    def grid(self) -> list[tuple]:
        return list(itertools.product(*(p.values for p in self.params)))

    def candidates(self) -> list[tuple[dict[str, float], Any]]:
        assert self.build is not None, "a Sweep made by the recipe loader carries its validator"
        out = []
        for values in self.grid():
            r = self.build(substitute(self.data, self.params, values), self.source)
            out.append(({p.label: v for p, v in zip(self.params, values)}, r))
        return out

    def describe(self) -> str:
        n = len(self.grid())
        what = ", ".join(f"{p.label} in {list(p.values)}" for p in self.params)
        return f"sweep: {n} candidate(s) over {what}"


def sweep_problems(data: dict, params: list[SweepParam]) -> list[tuple[str, str]]:
    """Checks that only make sense for a sweep (the per-value checks are the recipe's own)."""
    problems = []
    n = 1
    for p in params:
        n *= len(p.values)
    if n > MAX_CANDIDATES:
        problems.append((params[0].label, f"the sweep has {n} candidates (at most {MAX_CANDIDATES}); use fewer values"))
    v = data.get("validate")
    what = ", ".join(p.label for p in params)
    if not isinstance(v, dict):
        problems.append(("validate", f"{what} is a list, i.e. a sweep: add a validate block with tasks and select: task/metric to choose the winner"))
    elif not v.get("select"):
        problems.append(("validate.select", f"{what} is a list, i.e. a sweep: say which metric picks the winner, e.g. select: weightx_mc/acc"))
    return problems
