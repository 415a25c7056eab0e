"""The recipe: the recipe YAML (docs/recipe.md), as typed pydantic models that are also the Python API.

`load_recipe` reads YAML safely, applies `--set` overrides, and validates everything in one pass,
reporting every problem (with its location) in a single `RecipeError`.
"""

from __future__ import annotations

import math
import re
import stat
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from weightx.combine import COMBINES, CombineConfig
from weightx.edits import EDITS, EditConfig
from weightx.errors import RecipeError, UsageError
from weightx.io.safetensors import text_problem
from weightx.recipe.gates import parse_gate, parse_select
from weightx.recipe.mergekit import from_mergekit, is_mergekit
from weightx.recipe.sweep import Sweep, find_params, substitute, sweep_problems
from weightx.recipe.varying import VaryingParam, endpoints, evaluate, find_varying, first_value, setting_problems

MAX_YAML_ALIASES = 100
MAX_YAML_BYTES = 1 << 20


def _op_of(value: Any) -> str | None:
    if isinstance(value, (EditConfig, CombineConfig)):
        return value.op
    if isinstance(value, dict):
        return value.get("op")
    return None


def _tagged_union(registry: dict[str, type[BaseModel]], what: str, example: str) -> Any:
    members = tuple(Annotated[cls, Tag(name)] for name, cls in sorted(registry.items()))
    return Annotated[
        Union[members],  # type: ignore[valid-type]
        Discriminator(
            _op_of,
            custom_error_type=f"{what}_form",
            custom_error_message=f"write each {what} as a one-key mapping, e.g. `{example}`",
        ),
    ]


def _unwrap_op(value: Any) -> Any:
    """`{expo: {alpha: 0.3}}` → `{op: expo, alpha: 0.3}`; `sum` → `{op: sum}`."""
    if isinstance(value, str):
        return {"op": value}
    if isinstance(value, dict) and len(value) == 1 and "op" not in value:
        (op, params), = value.items()
        if params is None:
            params = {}
        if isinstance(params, dict):
            return {"op": op, **params}
    return value


Edit = _tagged_union(EDITS, "edit", "- expo: {alpha: 0.3}")
Combine = _tagged_union(COMBINES, "combine", "combine: {ties: {density: 0.2}}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeltaSpec(_Strict):
    model: str
    # This delta's own base (transplant, Chat Vector): the delta is θ_model − θ_base and is added to
    # the recipe's base. None: the recipe's base.
    base: str | None = None
    weight: float = 1.0
    edits: list[Edit] = Field(default_factory=list)  # type: ignore[valid-type]

    @field_validator("edits", mode="before")
    @classmethod
    def _unwrap(cls, v: Any) -> Any:
        return [_unwrap_op(e) for e in v] if isinstance(v, list) else v


SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | str) -> int:
    """'5GB' → 5·10⁹ (decimal like huggingface_hub), '5GiB' → 5·2³⁰, ints are bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r} (use e.g. 5GB, 500MB or a byte count)")
    if isinstance(value, int):
        return value
    m = SIZE_RE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 5GB, 500MB or a byte count)")
    size = float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    if not math.isfinite(size):
        raise ValueError(f"not a size: {value!r} is too large")
    return int(size)


class OutputSpec(_Strict):
    path: str | None = None
    format: Literal["dense", "delta", "lora"] = "dense"
    # format: lora: a fixed rank per matrix, or the smallest rank keeping `energy` of the delta's
    # squared singular values (Σ s²), capped by `max_rank`.
    rank: int | None = Field(None, gt=0)
    energy: float | None = Field(None, gt=0.0, le=1.0)
    max_rank: int | None = Field(None, gt=0)
    # format: lora: `exact` SVD, `randomized` (a seeded sketch; rank only), or `auto` (randomized for a
    # fixed rank on matrices whose smaller side is ≥ 1024, where it is much faster; else exact).
    svd: Literal["auto", "exact", "randomized"] = "auto"
    # format: lora: embeddings (and lm_head) saved whole (`modules_to_save`) or factored too (`lora`).
    embeddings: Literal["modules_to_save", "lora"] = "modules_to_save"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    shard_size: int | str = "5GB"
    config_from: str | None = None
    # Glob patterns of tensors to leave out of the output knowingly (a value head, an extra lm_head a
    # fine-tune has and config_from's model lacks); any other such tensor is a plan-time error.
    drop: list[str] = Field(default_factory=list)
    # A NaN/Inf in a computed output tensor (from an input, or an overflow): "error" stops the run
    # naming the tensor and the input that holds it; "warn" reports it and writes the output anyway.
    on_nonfinite: Literal["error", "warn"] = "error"

    @field_validator("shard_size", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # pydantic would take true as 1 byte
            raise ValueError(f"not a size: {v!r} (use e.g. 5GB, 500MB or a byte count)")
        return v

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        if parse_size(v) <= 0:
            raise ValueError("shard_size must be positive")
        return v

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    @model_validator(mode="after")
    def _lora(self) -> "OutputSpec":
        given = [k for k in ("rank", "energy", "max_rank") if getattr(self, k) is not None]
        given += [k for k in ("svd", "embeddings") if getattr(self, k) != type(self).model_fields[k].default]
        if self.format != "lora" and given:
            raise ValueError(f"{', '.join(given)} only apply to format: lora; set format: lora or remove them")
        if self.format == "lora":
            if (self.rank is None) == (self.energy is None):
                raise ValueError("format: lora takes either rank (e.g. rank: 64) or energy (e.g. energy: 0.9, with max_rank)")
            if self.rank is not None and self.max_rank is not None:
                raise ValueError("max_rank caps an energy-chosen rank; with a fixed rank, remove max_rank")
            if self.svd == "randomized" and self.energy is not None:
                raise ValueError("svd: randomized needs a fixed rank (energy needs every singular value); use svd: exact")
        return self


class ValidateSpec(_Strict):
    tasks: list[str] = Field(min_length=1)
    limit: int | float | None = None
    compare: list[str] = Field(default_factory=list)
    require: dict[str, str | float] = Field(default_factory=dict)
    batch_size: int | str = 1
    num_fewshot: int | None = None
    device: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # evaluation dtype; auto: fp32 on CPU
    select: str | None = None  # a sweep's winner: "[max|min] task/metric"
    # Local task YAMLs with `!function` tags import Python shipped next to them; refused unless true.
    allow_code_tasks: bool = False

    @field_validator("require")
    @classmethod
    def _gates(cls, v: dict[str, str | float]) -> dict[str, str | float]:
        problems = []
        for key, expr in v.items():
            try:
                parse_gate(key, expr)
            except ValueError as e:
                problems.append(f"{key}: {e}")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @field_validator("select")
    @classmethod
    def _select(cls, v: str | None) -> str | None:
        if v is not None:
            parse_select(v)
        return v

    @model_validator(mode="after")
    def _gate_refs(self) -> "ValidateSpec":
        for key, expr in self.require.items():
            ref = parse_gate(key, expr).ref
            if ref is not None and ref not in self.compare:
                raise ValueError(f"require.{key} compares with '{ref}', which is not in compare; add it to validate.compare")
        return self


REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}", re.ASCII)


def repo_id_problem(repo: str) -> str | None:
    """Why `repo` is not a Hub repo id (namespace/name), in one line; None if it is one."""
    if not REPO_ID.fullmatch(repo) or "--" in repo or ".." in repo or repo.endswith((".", "-", ".git")):
        return f"{repo!r} is not a Hub repo id; use namespace/name, e.g. my-user/zephyr-7b-expo"
    return None


def branch_problem(rev: str) -> str | None:
    """Why `rev` is not a branch name the Hub (git) accepts, in one line; None if it is one."""
    if (re.fullmatch(r"[0-9a-f]{40}", rev) or rev.startswith(("refs/", "-", "/", ".")) or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", rev)
            or ".." in rev or "//" in rev or rev.endswith(("/", ".", ".lock")) or "/." in rev):
        return f"revision {rev!r} is not a branch name; push to a branch such as main or dev"
    return None


class PushSpec(_Strict):
    repo: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str) -> str:
        if why := repo_id_problem(v):
            raise ValueError(why)
        return v

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        if v is not None and (why := branch_problem(v)):
            raise ValueError(why)
        return v


class TokenizerSpec(_Strict):
    """The output vocabulary (DESIGN.md "Vocabulary alignment"): `base`, `union` (the base's tokens,
    then every token a delta's model adds), or a model alias (that model's vocabulary)."""

    source: str = "base"


class Recipe(_Strict):
    """A weightx recipe. `Recipe.load(path)` reads YAML; `weightx.apply(recipe)` runs it."""

    name: str | None = None
    models: dict[str, str] = Field(min_length=1)
    base: str
    deltas: list[DeltaSpec] = Field(min_length=1)
    combine: Combine = Field(default_factory=lambda: COMBINES["sum"]())  # type: ignore[valid-type]
    output: OutputSpec = Field(default_factory=OutputSpec)
    validate_: ValidateSpec | None = Field(default=None, alias="validate")
    push: PushSpec | None = None
    tokenizer: TokenizerSpec | None = None  # None: every model must have the base's embedding rows
    # Pickle checkpoints (.bin/.pt) are refused unless this is true; then they are read with
    # torch.load(weights_only=True), which builds tensors only and never runs code from the file.
    allow_pickle: bool = False

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    _sweep: Any = PrivateAttr(default=None)  # weightx.recipe.sweep.Sweep when a parameter is a list
    # Gradient- or filter-valued parameters (weightx.recipe.varying); fields hold the first endpoint.
    _varying: tuple = PrivateAttr(default=())
    _notes: tuple = PrivateAttr(default=())  # what reading a mergekit config ignored or read differently
    _folder: Path | None = PrivateAttr(default=None)  # the recipe file's folder: where relative paths start

    @property
    def sweep(self) -> Any:
        """The sweep (list-valued parameters) this recipe stands for, or None; fields hold the first candidate."""
        return self._sweep

    @property
    def notes(self) -> tuple[str, ...]:
        """Notes from reading the recipe (a mergekit config's ignored options), for the plan."""
        return self._notes

    @property
    def varying(self) -> tuple:
        """The parameters that vary by tensor (`weightx.recipe.varying.VaryingParam`), or ()."""
        return self._varying

    def resolve(self, name: str, t: float) -> tuple[tuple[float, ...], tuple[tuple[EditConfig, ...], ...], CombineConfig]:
        """(delta weights, edits per delta, combine) for tensor `name` at layer position t: the
        recipe's own objects where nothing varies, validated copies with the values set otherwise."""
        weights = [d.weight for d in self.deltas]
        edits = [list(d.edits) for d in self.deltas]
        combine = self.combine
        for p in self._varying:
            v = evaluate(p.setting, name, t)
            path = p.label.split(".")
            if path[0] == "combine":
                combine = type(combine).model_validate({**combine.model_dump(), path[-1]: v})
            elif path[2] == "weight":
                weights[int(path[1])] = v
            else:
                i, j = int(path[1]), int(path[3])
                e = edits[i][j]
                edits[i][j] = type(e).model_validate({**e.model_dump(), path[-1]: v})
        return tuple(weights), tuple(tuple(es) for es in edits), combine

    @property
    def folder(self) -> Path | None:
        """The folder of the file this recipe was read from (relative paths start there), or None."""
        return self._folder

    @field_validator("combine", mode="before")
    @classmethod
    def _unwrap(cls, v: Any) -> Any:
        return _unwrap_op(v)

    @model_validator(mode="after")
    def _references(self) -> "Recipe":
        problems = reference_problems(self.model_dump(by_alias=True))
        combine_problem = self.combine.check([d.weight for d in self.deltas])
        if combine_problem:
            problems.append(("combine", combine_problem))
        if problems:
            raise ValueError("\n".join(f"{loc}: {msg}" for loc, msg in problems))
        return self

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "Recipe":
        return load_recipe(path, overrides)

    @property
    def config_from(self) -> str:
        return self.output.config_from or self.deltas[-1].model

    def delta_base(self, i: int) -> str:
        """The alias delta i is taken against: its own `base:`, else the recipe's."""
        return self.deltas[i].base or self.base

    def recipe_form(self) -> dict:
        """The recipe as YAML-ready data, defaults filled in (what `weightx.json` records)."""
        data = self.model_dump(by_alias=True, exclude_none=True, exclude={"deltas", "combine"})
        data["deltas"] = [
            {"model": d.model, **({"base": d.base} if d.base is not None else {}), "weight": d.weight,
             "edits": [e.recipe_form() for e in d.edits]}
            for d in self.deltas
        ]
        data["combine"] = self.combine.recipe_form()
        for p in self._varying:  # put the gradients and filter lists back where the recipe had them
            node = data
            for key in p.label.split(".")[:-1]:
                node = node[int(key)] if isinstance(node, list) else node[key]
            node[p.label.split(".")[-1]] = p.setting
        if self._sweep is not None:  # put the swept lists back where the recipe had them
            for p in self._sweep.params:
                node: Any = data
                for key in p.label.split(".")[:-1]:
                    node = node[int(key)] if isinstance(node, list) else node[key]
                node[p.label.split(".")[-1]] = list(p.values)
        return data


def reference_problems(data: Any) -> list[tuple[str, str]]:
    """Alias checks that need the whole recipe; works on raw (possibly invalid) data."""
    if not isinstance(data, dict):
        return []
    models = data.get("models")
    aliases = set(models) if isinstance(models, dict) else set()
    known = ", ".join(sorted(map(str, aliases))) or "none"
    problems: list[tuple[str, str]] = []

    def check(loc: str, alias: Any) -> None:
        if isinstance(alias, str) and aliases and alias not in aliases:
            twin = [a for a in aliases if isinstance(a, str) and unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", alias)]
            if twin:
                problems.append((loc, f"{alias!r} differs from the alias {twin[0]!r} under models only in its Unicode form; retype one of them"))
            else:
                problems.append((loc, f"'{alias}' is not defined under models (defined: {known})"))

    check("base", data.get("base"))
    deltas = data.get("deltas")
    for i, d in enumerate(deltas if isinstance(deltas, list) else []):
        if isinstance(d, dict):
            check(f"deltas.{i}.model", d.get("model"))
            own = d.get("base")
            if own is not None:
                check(f"deltas.{i}.base", own)
            against = own if own is not None else data.get("base")
            if d.get("model") is not None and d.get("model") == against:
                where = f"deltas.{i}.base" if own is not None else "the base"
                problems.append((f"deltas.{i}.model", f"'{d['model']}' is {where}: its delta is zero"))
    output = data.get("output")
    if isinstance(output, dict):
        check("output.config_from", output.get("config_from"))
    tok = data.get("tokenizer")
    if isinstance(tok, dict) and tok.get("source") not in (None, "base", "union"):
        check("tokenizer.source", tok.get("source"))
    validate = data.get("validate")
    if isinstance(validate, dict) and isinstance(validate.get("compare"), list):
        for i, a in enumerate(validate["compare"]):
            check(f"validate.compare.{i}", a)
    return problems


def _loc(parts: tuple[Any, ...]) -> str:
    out: list[str] = []
    for p in parts:
        p = str(p)
        if p.startswith("function-") or (out and out[-1] == p):
            continue  # pydantic's validator frames, and tag + field of the same name
        out.append("validate" if p == "validate_" else p)
    return ".".join(out)


def _messages(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = _loc(e["loc"])
        if e["type"] in ("edit_form", "combine_form") and _op_of(e["input"]) is not None:
            kind = e["type"].removesuffix("_form")
            known = ", ".join(sorted(COMBINES if kind == "combine" else EDITS))
            problems.append((loc, f"unknown {kind} '{_op_of(e['input'])}' (known: {known})"))
        elif e["type"] == "extra_forbidden":
            parent, _, key = loc.rpartition(".")
            problems.append((parent, f"unknown key '{key}'"))
        elif e["type"] == "value_error" and not loc:
            for line in str(e["ctx"]["error"]).splitlines():
                where, _, msg = line.partition(": ")
                problems.append((where, msg))
        else:
            problems.append((loc, e["msg"].removeprefix("Value error, ")))
    return problems


def value_problems(data: Any) -> list[tuple[str, str]]:
    """Numbers that are NaN/Inf and text with invisible or control characters, anywhere in a recipe.

    On validated data (a model dump) this also sees strings pydantic turned into floats ("nan"). An
    edit or combine mapping carries its `op`, which is put back into the location as the recipe has it."""
    problems: list[tuple[str, str]] = []
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:  # iterative: API callers can pass arbitrarily deep dicts
        loc, node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            problems.append((loc, f"must be a finite number, not {node}"))
        elif isinstance(node, str):
            if why := text_problem(node):
                problems.append((loc, f"{node!r} contains {why}; retype it"))
        elif isinstance(node, dict):
            op = node.get("op") if isinstance(node.get("op"), str) else None
            for k, v in node.items():
                if isinstance(k, str) and (why := text_problem(k)):
                    problems.append((loc, f"key {k!r} contains {why}; retype it"))
                if k == "op" and op is not None:
                    continue
                stack.append((".".join(p for p in (loc, op, str(k)) if p), v))
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{loc}.{i}" if loc else str(i), v) for i, v in enumerate(node))
    return sorted(problems)


def validate_recipe(data: Any, source: str = "recipe", *, sweep: bool = True) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(source, [("", "a recipe is a YAML mapping with models, base, deltas and output")])
    varying = find_varying(data)
    if varying:
        return _validate_varying(data, varying, source, sweep)
    if sweep:
        params = find_params(data)
        if params:
            return _validate_sweep(data, params, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = _messages(err)
        # Field errors stop pydantic before the cross-reference check; run it anyway so the user
        # sees every problem in one go.
        seen = set(problems)
        problems += [p for p in reference_problems(data) + value_problems(data) if p not in seen]
        raise RecipeError(source, problems) from None
    problems = value_problems(recipe.model_dump(by_alias=True))
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _validate_varying(data: dict, params: list[VaryingParam], source: str, sweep: bool) -> Recipe:
    """A recipe with gradient- or filter-valued parameters: the recipe is checked whole with each
    setting's first value, and every other endpoint on its own (interpolated values lie between
    endpoints), so all problems come out in one go."""
    problems: list[tuple[str, str]] = []
    for p in params:
        problems += setting_problems(p.setting, p.label)
    if problems:
        raise RecipeError(source, problems)
    if sweep and find_params(substitute(data, params, [first_value(p.setting) for p in params])):
        raise RecipeError(source, [(params[0].label, "a recipe with gradients or filters cannot also sweep a list of values; run the sweep without them")])
    firsts = [first_value(p.setting) for p in params]
    recipe = None
    try:
        recipe = validate_recipe(substitute(data, params, firsts), source, sweep=False)
    except RecipeError as e:
        problems += e.problems
    for i, p in enumerate(params):
        for value in endpoints(p.setting)[1:]:
            try:
                validate_recipe(substitute(data, params, firsts[:i] + [value] + firsts[i + 1:]), source, sweep=False)
            except RecipeError as e:
                problems += [(loc, f"{msg} (in its gradient or filter values)") for loc, msg in e.problems if loc == p.label]
    if problems or recipe is None:
        raise RecipeError(source, list(dict.fromkeys(problems)))
    recipe._varying = tuple(params)
    return recipe


def _validate_sweep(data: dict, params: list, source: str) -> Recipe:
    """A recipe with list-valued parameters: every candidate must be a valid scalar recipe.

    The first candidate is checked whole; every other value of each list is checked on its own, and
    its problems are reported at `<param>.<index>` so all problems still come out in one go.
    """
    firsts = tuple(p.values[0] for p in params)
    problems: list[tuple[str, str]] = []
    recipe = None
    try:
        recipe = validate_recipe(substitute(data, params, firsts), source, sweep=False)
    except RecipeError as e:
        for loc, msg in e.problems:
            hit = next((p for p in params if loc == p.label), None)
            problems.append((f"{loc}.0" if hit else loc, msg))
    for i, p in enumerate(params):
        for k, value in enumerate(p.values[1:], start=1):
            values = firsts[:i] + (value,) + firsts[i + 1:]
            try:
                validate_recipe(substitute(data, params, values), source, sweep=False)
            except RecipeError as e:
                problems += [(f"{p.label}.{k}", msg) for loc, msg in e.problems if loc == p.label]
    problems += [q for q in sweep_problems(data, params) if q not in problems]
    if problems or recipe is None:
        raise RecipeError(source, list(dict.fromkeys(problems)))
    recipe._sweep = Sweep(params, data, source, lambda d, s: validate_recipe(d, s, sweep=False))
    return recipe


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents with many aliases ("billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} YAML aliases; refusing to expand")
        return super().compose_node(parent, index)


MAX_YAML_NODES = 100_000


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Node count once aliases are expanded, computed on the shared graph (linear time)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once instead of looping
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(c, memo) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = size
    return size


def _safe_load(text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"document expands to more than {MAX_YAML_NODES} nodes through aliases; refusing")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode) and not (stat.S_ISFIFO(mode) and str(path).startswith(("/dev/fd/", "/proc/self/fd/"))):
            # a named FIFO or a device would block or never end; `<(cat r.yaml)` (a pipe) is fine
            raise UsageError(f"{path} is not a recipe file (a FIFO, device or folder); give a YAML file")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise UsageError(f"{path}: recipe is larger than 1 MB; is this the right file?")
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_YAML_BYTES + 1)
        if len(text) > MAX_YAML_BYTES:
            raise UsageError(f"{path}: recipe is larger than 1 MB; is this the right file?")
    except FileNotFoundError:
        raise UsageError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read recipe {path}: {e}") from None
    try:
        return _safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise UsageError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    except (ValueError, OverflowError, TypeError) as e:  # a scalar PyYAML cannot build: 2001-13-45, 5000-digit ints
        raise UsageError(f"{path}: invalid YAML value: {' '.join(str(e).split())[:200]}") from None


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `key.path=value` overrides; values are parsed as YAML scalars/flow collections."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected key.path=value, e.g. deltas.0.weight=1.5")
        try:
            value = _safe_load(raw) if raw else ""
        except (yaml.YAMLError, RecursionError, ValueError, OverflowError, TypeError):
            value = raw  # not YAML: the value is the text itself
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UsageError(f"--set {key}: '{part}' is not an index of a {len(node)}-item list")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise UsageError(f"--set {key}: '{'.'.join(parts[:i])}' is not a mapping or list")
    return data


def load_recipe(
    source: str | Path | dict | Recipe, overrides: list[str] | tuple[str, ...] = ()
) -> Recipe:
    if isinstance(source, Recipe):
        if not overrides:
            return source
        recipe = validate_recipe(apply_overrides(source.recipe_form(), overrides), "recipe")
        recipe._folder = source.folder
        return recipe
    if isinstance(source, dict):
        return validate_recipe(apply_overrides(dict(source), overrides), "recipe")
    data = read_yaml(source)
    notes: list[str] = []
    if is_mergekit(data):
        data, notes = from_mergekit(data, name=Path(source).stem)
        notes.insert(0, f"{source} is a mergekit config, read as the native recipe `weightx plan --explain` prints")
    if isinstance(data, dict):
        data = apply_overrides(data, overrides)
    recipe = validate_recipe(data, str(source))
    recipe._notes = tuple(notes)
    path = Path(source)
    recipe._folder = path.resolve().parent if path.is_file() else None  # a pipe: the working directory
    return recipe
