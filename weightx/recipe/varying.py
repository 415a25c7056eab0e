"""Parameters that vary by tensor: mergekit's gradients and filters, over raw recipe data.

Any numeric parameter (a delta's `weight`, an edit's or the combine's) may be written as
- `{gradient: [v0, v1, …]}`: interpolated over the layer position t ∈ [0, 1], as mergekit spreads a
  list: s = t·(len − 1), value = (1 − (s − ⌊s⌋))·v[⌊s⌋] + (s − ⌊s⌋)·v[⌊s⌋ + 1];
- a list of `{filter: <substring>, value: …}` entries, the first whose filter is a substring of the
  tensor name (or is absent or `*`) giving the value, which may itself be a gradient. The last
  entry should have no filter (mergekit's form; without one a tensor no filter matches is an error).
A plain list of numbers keeps meaning a sweep (`weightx.recipe.sweep`).

Layer position (mergekit's): tensors `<stack>.<i>.…` of a stack of n layers have t = i/(n − 1)
(t = 1 when n = 1); every other tensor (embeddings, final norm, lm_head) has t = 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from weightx.recipe.sweep import parameter_sites

_LAYER = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def is_gradient(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"gradient"}


def is_filtered(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(e, dict) and "value" in e for e in v)


def is_varying(v: Any) -> bool:
    return is_gradient(v) or is_filtered(v)


@dataclass(frozen=True)
class VaryingParam:
    raw_path: tuple  # where the setting sits in the recipe data as written
    label: str  # canonical location, e.g. deltas.0.edits.0.dare.drop
    setting: Any  # the gradient dict or filter list, as written


def find_varying(data: dict) -> list[VaryingParam]:
    """Every gradient- or filter-valued parameter of raw recipe data, in recipe order."""
    return [VaryingParam(path, label, v) for path, label, v in parameter_sites(data) if is_varying(v)]


def setting_problems(setting: Any, label: str) -> list[tuple[str, str]]:
    """Shape checks of one setting (the values themselves are checked by the recipe model)."""
    if is_gradient(setting):
        g = setting["gradient"]
        if not isinstance(g, list) or not g or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in g):
            return [(label, "a gradient is {gradient: [v0, v1, ...]}: a non-empty list of numbers")]
        return []
    if is_filtered(setting):
        out = []
        for k, e in enumerate(setting):
            extra = set(e) - {"filter", "value"}
            if extra:
                out.append((f"{label}.{k}", f"a filter entry has only filter and value, not {', '.join(sorted(extra))}"))
            if "filter" in e and not isinstance(e["filter"], str):
                out.append((f"{label}.{k}", "filter is a substring of tensor names, e.g. self_attn"))
            v = e.get("value")
            if is_gradient(v):
                out += setting_problems(v, f"{label}.{k}.value")
            elif not isinstance(v, (int, float)) or isinstance(v, bool):
                out.append((f"{label}.{k}.value", "a filter entry's value is a number or {gradient: [...]}"))
        if "filter" in setting[-1] and setting[-1]["filter"] not in (None, "*"):
            out.append((label, "end the filter list with an entry without filter (the value for every other tensor)"))
        return out
    return [(label, "expected a number, {gradient: [...]}, or a list of {filter, value} entries")]


def endpoints(setting: Any) -> list[float]:
    """Every value the setting can take at its extremes (interpolation stays between them)."""
    if is_gradient(setting):
        return [float(x) for x in setting["gradient"]]
    return [v for e in setting for v in (endpoints(e["value"]) if is_gradient(e["value"]) else [float(e["value"])])]


def evaluate(setting: Any, name: str, t: float) -> float:
    """The setting's value for tensor `name` at layer position t (mergekit's rules)."""
    if is_gradient(setting):
        g = [float(x) for x in setting["gradient"]]
        if len(g) == 1:
            return g[0]
        s = t * (len(g) - 1)
        i0 = int(s)
        i1 = min(len(g) - 1, i0 + 1)
        frac = s - i0
        return (1 - frac) * g[i0] + frac * g[i1]
    if is_filtered(setting):
        for e in setting:
            f = e.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate(e["value"], name, t)
        raise KeyError(name)
    return float(setting)


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """t ∈ [0, 1] per tensor name (see the module doc)."""
    names = list(names)
    stacks: dict[str, int] = {}
    found: dict[str, tuple[str, int]] = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            found[n] = (m.group(1), int(m.group(2)))
            stacks[m.group(1)] = max(stacks.get(m.group(1), 0), int(m.group(2)) + 1)
    out = {}
    for n in names:
        if n not in found:
            out[n] = 0.0
            continue
        stack, i = found[n]
        count = stacks[stack]
        out[n] = i / (count - 1) if count > 1 else 1.0
    return out


def first_value(setting: Any) -> float:
    """A representative value (the first endpoint) for validating the rest of the recipe."""
    return endpoints(setting)[0]
