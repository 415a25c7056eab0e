"""mergekit configs as input: a mergekit YAML (top-level `merge_method`) read as a native recipe.

Pure data → data: `from_mergekit(config)` returns the native recipe (a dict the recipe model then
validates as usual) and notes on what was ignored or read differently. Methods and their native form:

| mergekit `merge_method` | native recipe |
|---|---|
| `linear` | `combine: linear` (the base, when listed among the models, is `base_weight`) |
| `task_arithmetic` | `combine: sum`, weights × `lambda` (÷ Σ weights with `normalize`) |
| `ties`, `dare_ties`, `breadcrumbs_ties`, `della` | per-delta `magnitude` / `dare` / `breadcrumbs` / `della`, then `combine: ties` with density 1 |
| `dare_linear`, `breadcrumbs`, `della_linear` | the same edits, then `combine: sum` (`linear` with `normalize`) |
| `slerp` | `combine: slerp` |
| `model_stock` | `combine: model_stock` |
| `nuslerp` | `combine: nuslerp` (two deltas; without a base, the first model is the base and t = w_1/(w_0 + w_1)) |
| `sce` | `combine: sce` |

A mergekit list-valued parameter is a gradient (`{gradient: [...]}`) and its filter lists carry
over. `slices`, `passthrough` and the methods weightx lacks are refused in one line.
Paths are read as mergekit reads them: relative to the working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from weightx.errors import RecipeError

# method → (per-delta edit, combine, mergekit's default for normalize, for rescale)
METHODS: dict[str, tuple[str | None, str, bool, bool]] = {
    "linear": (None, "linear", True, False),
    "task_arithmetic": (None, "sum", False, False),
    "ties": ("magnitude", "ties", True, False),
    "dare_ties": ("dare", "ties", False, True),
    "dare_linear": ("dare", "sum", False, True),
    "breadcrumbs": ("breadcrumbs", "sum", False, False),
    "breadcrumbs_ties": ("breadcrumbs", "ties", False, False),
    "della": ("della", "ties", True, True),
    "della_linear": ("della", "sum", False, True),
    "slerp": (None, "slerp", False, False),
    "model_stock": (None, "model_stock", False, False),
    "nuslerp": (None, "nuslerp", False, False),
    "sce": (None, "sce", False, False),
}
NOT_DELTA = {"passthrough": "it stacks layers rather than merging them", "slices": "it stacks layer ranges"}
KNOWN_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "tokenizer", "chat_template", "name"}


def is_mergekit(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _gradient(v: Any) -> Any:
    """mergekit's setting → native: a list of numbers is a gradient; filter lists recurse."""
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return {"gradient": list(v)}
    if isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
        return [{**({"filter": e["filter"]} if e.get("filter") is not None else {}), "value": _gradient(e.get("value"))} for e in v]
    return v


def _affine(v: Any, a: float, b: float = 0.0) -> Any:
    """a·v + b of a (possibly varying) numeric setting."""
    if a == 1.0 and b == 0.0:
        return v
    if isinstance(v, dict) and "gradient" in v:
        return {"gradient": [a * x + b for x in v["gradient"]]}
    if isinstance(v, list):
        return [{**e, "value": _affine(e["value"], a, b)} for e in v]
    return a * v + b


def _model_ref(entry: Any, where: str) -> str:
    ref = entry.get("model") if isinstance(entry, dict) else entry
    if isinstance(ref, dict):  # mergekit's long form {model: {path: …, lora: …}}
        if ref.get("lora"):
            raise RecipeError("mergekit config", [(where, "LoRA-applied models (model+lora) are not supported; merge the adapter into the model first")])
        ref = ref.get("path")
    if not isinstance(ref, str) or not ref:
        raise RecipeError("mergekit config", [(where, "expected a model path or Hub id")])
    if "+" in ref:
        raise RecipeError("mergekit config", [(where, f"{ref!r}: LoRA-applied models (model+lora) are not supported; merge the adapter into the model first")])
    return ref


def _local(ref: str, cwd: Path) -> str:
    p = Path(ref).expanduser()
    return str((cwd / p).resolve()) if not p.is_absolute() and (cwd / p).exists() else ref


def _alias(ref: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", ref.rstrip("/").split("/")[-1].split("@")[0]) or "model"
    alias, n = stem, 2
    while alias in taken:
        alias, n = f"{stem}_{n}", n + 1
    taken.add(alias)
    return alias


def from_mergekit(config: dict, cwd: Path | None = None, name: str | None = None) -> tuple[dict, list[str]]:
    """(native recipe data, notes) for a mergekit config; RecipeError for what weightx cannot run."""
    cwd = cwd or Path.cwd()
    method = config.get("merge_method")
    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    if not isinstance(method, str):
        raise RecipeError("mergekit config", [("merge_method", f"expected a method name such as ties or slerp, got {method!r}")])
    if "slices" in config:
        raise RecipeError("mergekit config", [("slices", "slices stack layer ranges of models: not a delta merge, which is what weightx does; use mergekit for it")])
    if method in NOT_DELTA:
        raise RecipeError("mergekit config", [("merge_method", f"{method}: not a delta merge ({NOT_DELTA[method]}); use mergekit for it")])
    if method not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise RecipeError("mergekit config", [("merge_method", f"{method!r} is not a method weightx runs (it runs {known})")])
    for k in sorted(set(config) - KNOWN_TOP):
        problems.append((k, f"unknown mergekit key {k!r} (weightx reads {', '.join(sorted(KNOWN_TOP))})"))
    edit_op, combine_op, norm_default, rescale_default = METHODS[method]
    params = config.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecipeError("mergekit config", [("parameters", "parameters is a mapping, e.g. {normalize: true, lambda: 1.0}")])
    params = dict(params)
    models = config.get("models") or []
    if not isinstance(models, list) or not models:
        raise RecipeError("mergekit config", [("models", "a mergekit config lists its models under models:")])

    taken: set[str] = set()
    aliases: dict[str, str] = {}  # ref → alias
    sources: dict[str, str] = {}

    def alias_of(ref: str) -> str:
        if ref not in aliases:
            aliases[ref] = a = _alias(ref, taken)
            sources[a] = _local(ref, cwd)
        return aliases[ref]

    base_ref = config.get("base_model")
    if isinstance(base_ref, (dict, str)):
        base_ref = _model_ref({"model": base_ref}, "base_model")
    entries = []
    for i, m in enumerate(models):
        try:
            ref = _model_ref(m, f"models.{i}")
        except RecipeError as e:  # every model's problem, not only the first
            problems += e.problems
            continue
        p = m.get("parameters") if isinstance(m, dict) else None
        if p is not None and not isinstance(p, dict):
            problems.append((f"models.{i}.parameters", "parameters is a mapping, e.g. {weight: 0.5, density: 0.3}"))
            p = None
        entries.append((ref, dict(p or {})))
    if problems:
        raise RecipeError("mergekit config", problems)
    base_weight = 0.0
    if base_ref is None:
        if method not in ("linear", "nuslerp"):
            raise RecipeError("mergekit config", [("base_model", f"{method} takes deltas against a base: set base_model")])
        base_ref, first = entries[0]
        base_weight = first.get("weight", params.get("weight", 1.0))
        entries = entries[1:]
        if not entries:
            raise RecipeError("mergekit config", [("models", f"a {method} merge of one model is that model; list at least two")])
    else:
        listed = [e for e in entries if e[0] == base_ref]
        if listed and method == "linear":
            base_weight = listed[0][1].get("weight", params.get("weight", 1.0))
        entries = [e for e in entries if e[0] != base_ref]  # the base's own delta is zero
    base = alias_of(base_ref)

    def param(p: dict, key: str, default: Any = None) -> Any:
        return _gradient(p[key]) if key in p else _gradient(params[key]) if key in params else default

    normalize = params.get("normalize", norm_default)
    lam = params.get("lambda", 1.0)
    rescale = params.get("rescale", rescale_default)
    if params.get("int8_mask") is not None:
        notes.append("int8_mask is a mergekit memory option; ignored (weightx streams blocks)")
    if not isinstance(lam, (int, float)):
        problems.append(("parameters.lambda", "lambda must be a number here"))
        lam = 1.0

    deltas = []
    weights = []
    for i, (ref, p) in enumerate(entries):
        w = param(p, "weight", 1.0)
        weights.append(w)
        d: dict[str, Any] = {"model": alias_of(ref), "weight": w}
        edits = []
        density = param(p, "density", 1.0)
        if edit_op == "magnitude" and density != 1.0:
            edits.append({"magnitude": {"density": density}})
        elif edit_op == "dare" and density != 1.0:
            edits.append({"dare": {"drop": _affine(density, -1.0, 1.0), "rescale": "l1" if rescale else "none"}})
        elif edit_op == "breadcrumbs":
            edits.append({"breadcrumbs": {"density": density, "gamma": param(p, "gamma", 0.01)}})
        elif edit_op == "della":
            edits.append({"della": {"density": density, "epsilon": param(p, "epsilon", 0.15), "rescale": "l1" if rescale else "none"}})
        if edits:
            d["edits"] = edits
        deltas.append(d)

    varying_weights = any(not isinstance(w, (int, float)) for w in weights)
    combine: Any
    if combine_op == "linear":
        combine = {"linear": {"normalize": bool(normalize), "base_weight": base_weight}}
        if lam != 1.0:
            problems.append(("parameters.lambda", "linear has no lambda; scale the weights instead"))
    elif combine_op == "sum":
        if normalize:
            if varying_weights:
                combine = {"linear": {"normalize": True}}
                if lam != 1.0:
                    problems.append(("parameters.lambda", "lambda with normalize and per-layer weights is not supported yet"))
            else:
                total = sum(weights)
                if total == 0:
                    problems.append(("parameters.normalize", "normalize divides by the sum of the weights, which is 0"))
                    total = 1.0
                for d in deltas:
                    d["weight"] = d["weight"] * lam / total
                combine = "sum"
        else:
            for d in deltas:
                d["weight"] = _affine(d["weight"], float(lam))
            combine = "sum"
    elif combine_op == "ties":
        combine = {"ties": {"density": 1.0, "normalize": bool(normalize), "scale": float(lam)}}
    elif combine_op == "slerp":
        if "t" not in params:
            problems.append(("parameters.t", "slerp needs t (0 = the base, 1 = the other model)"))
        combine = {"slerp": {"t": _gradient(params.get("t", 0.5))}}
        if len(deltas) != 1:
            problems.append(("models", f"slerp takes the base and exactly one other model, got {len(deltas)} others"))
    elif combine_op == "nuslerp":
        opts = {"flatten": bool(params.get("nuslerp_flatten", True)), "row_wise": bool(params.get("nuslerp_row_wise", False))}
        if config.get("base_model") is None:  # two models: the first is the base, t from the weights
            w0, w1 = base_weight, weights[0] if weights else 1.0
            if not isinstance(w0, (int, float)) or not isinstance(w1, (int, float)):
                problems.append(("models", "nuslerp without a base needs plain number weights"))
                w0 = w1 = 1.0
            opts["t"] = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
            deltas[0]["weight"] = 1.0
        combine = {"nuslerp": opts}
        if len(deltas) not in (1, 2) or (config.get("base_model") is not None and len(deltas) != 2):
            problems.append(("models", f"nuslerp takes exactly two models besides the base, got {len(deltas)}"))
    elif combine_op == "sce":
        combine = {"sce": {"select_topk": params.get("select_topk", 1.0)}}
        for d in deltas:
            d.pop("weight")
    else:  # model_stock
        combine = {"model_stock": {"filter_wise": bool(params.get("filter_wise", False))}}
        for d in deltas:
            d.pop("weight")

    out: dict[str, Any] = {}
    if "dtype" in config:
        notes.append(f"dtype {config['dtype']}: weightx computes in float32 and rounds once, whatever mergekit's dtype says")
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is not None:
        out["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
    tok = config.get("tokenizer_source")
    if tok is None and isinstance(config.get("tokenizer"), dict):
        tok = config["tokenizer"].get("source")
    if tok in (None, "base"):
        out["config_from"] = base  # mergekit copies the base model's tokenizer and config
    elif tok == "union":  # rows aligned by token; config and tokenizer files from the base, then the union's
        out["config_from"] = base
        notes.append("tokenizer_source union: rows are aligned by token (weightx's rule: a token the base lacks starts"
                     " from the mean of the rows of the models that have it; a model without a token adds no delta to it)")
    else:
        out["config_from"] = alias_of(_model_ref({"model": tok}, "tokenizer_source"))
    if config.get("chat_template"):
        notes.append("chat_template is ignored: the output keeps the config source's template")
    if problems:
        raise RecipeError("mergekit config", problems)
    recipe: dict[str, Any] = {"name": name or config.get("name") or f"{method} merge", "models": sources, "base": base,
                              "deltas": deltas, "combine": combine, "output": out}
    if tok == "union":
        recipe["tokenizer"] = {"source": "union"}
    return recipe, notes
