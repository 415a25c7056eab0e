"""The plan: every output tensor, its inputs, edits and shard, computed from headers alone.

Nothing here reads tensor data. All problems are collected and raised together as a PlanError, so
a user fixes a recipe in one round trip instead of one error per run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from weightx.edits.base import EditConfig
from weightx.errors import InputError, PlanError, UsageError
from weightx.recipe import DeltaSpec, Recipe
from weightx.safetensors_io import DTYPE_NAMES, TORCH_DTYPES, OutTensor, itemsize
from weightx.sources import Source, resolve

VOCAB_NAMES = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|output\.weight$)")


def natural_key(name: str) -> list:
    """layers.2 sorts before layers.10, so shards follow the model's structure."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors code
    edit: bool  # False: copied unchanged from config_from (non-float tensors)
    edits: list[list[EditConfig]] = field(default_factory=list)  # per delta, the edits that apply
    elementwise: bool = True  # every edit and the combine work per element: safe to stream in blocks
    # format: delta only: the compressing edit that encodes this tensor, and the parts it writes
    codec: EditConfig | None = None
    parts: list[OutTensor] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out(self) -> OutTensor:
        return OutTensor(self.name, self.out_dtype, self.shape)

    @property
    def outs(self) -> list[OutTensor]:
        """What is written for this tensor: itself, or its compressed parts."""
        return self.parts if self.parts is not None else [self.out]


@dataclass
class ShardPlan:
    filename: str
    tensors: list[TensorPlan]

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for t in self.tensors for o in t.outs)


@dataclass
class Plan:
    recipe: Recipe
    sources: dict[str, Source]
    out_path: Path
    tensors: list[TensorPlan]
    shards: list[ShardPlan]
    notes: list[str] = field(default_factory=list)

    @property
    def base(self) -> Source:
        return self.sources[self.recipe.base]

    @property
    def config_source(self) -> Source:
        return self.sources[self.recipe.config_from]

    @property
    def deltas(self) -> list[tuple[DeltaSpec, Source]]:
        return [(d, self.sources[d.model]) for d in self.recipe.deltas]

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    def edit_counts(self) -> list[dict[str, int]]:
        """Per delta: how many tensors each edit touches."""
        counts: list[dict[str, int]] = [dict.fromkeys((e.op for e in d.edits), 0) for d in self.recipe.deltas]
        for t in self.tensors:
            for i, edits in enumerate(t.edits):
                for e in edits:
                    counts[i][e.op] += 1
        return counts


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def split_shards(tensors: list[TensorPlan], shard_bytes: int) -> list[ShardPlan]:
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        nbytes = sum(o.nbytes for o in t.outs)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    return [ShardPlan(name, g) for name, g in zip(shard_names(len(groups)), groups)]


def resolve_sources(recipe: Recipe, recipe_dir: Path | None = None) -> dict[str, Source]:
    """Resolve every model the recipe uses; collect all failures before raising."""
    used = {recipe.base, recipe.config_from, *(d.model for d in recipe.deltas)}
    sources, problems = {}, []
    for alias, spec in recipe.models.items():
        if alias not in used:
            continue
        try:
            sources[alias] = resolve(alias, spec, recipe_dir, allow_pickle=recipe.allow_pickle)
        except InputError as e:
            problems.append(str(e))
    if problems:
        if len(problems) == 1:
            raise InputError(problems[0])
        raise PlanError(problems)
    return sources


def build_plan(recipe: Recipe, output: str | Path | None = None, recipe_dir: Path | None = None) -> Plan:
    out = output or recipe.output.path
    if not out:
        raise UsageError("output.path is not set: add `output: {path: ...}` to the recipe or pass --output PATH")
    out_path = Path(out).expanduser().resolve()
    sources = resolve_sources(recipe, recipe_dir)
    problems: list[str] = []
    notes: list[str] = []

    for alias, src in sources.items():
        root = src.root if src.kind != "file" else next(iter(src.headers.values())).path
        if _inside(out_path, root):
            problems.append(f"output.path {out_path} is {'the same as' if out_path == root else 'inside'} input '{alias}' ({root}); write elsewhere")
        elif _inside(root, out_path):
            problems.append(f"input '{alias}' ({root}) is inside output.path {out_path}; write elsewhere")

    base = sources[recipe.base]
    cfg = sources[recipe.config_from]
    deltas = [(d, sources[d.model]) for d in recipe.deltas]
    forced = recipe.output.dtype
    tensors: list[TensorPlan] = []
    for name in sorted(cfg.weight_map, key=natural_key):
        info = cfg.info(name)
        if not info.is_float:
            tensors.append(TensorPlan(name, info.shape, info.dtype, edit=False))
            continue
        ok = True
        for alias, src in [(recipe.base, base)] + [(d.model, s) for d, s in deltas]:
            if name not in src.weight_map:
                problems.append(f"tensor {name!r} is missing from '{alias}' ({src.describe()})")
                ok = False
                continue
            other = src.info(name)
            if other.shape != info.shape:
                if VOCAB_NAMES.search(name) and other.shape[1:] == info.shape[1:] and other.shape[:1] != info.shape[:1]:
                    problems.append(
                        f"vocab-size mismatch: {name!r} has {other.shape[0]} rows in '{alias}' but {info.shape[0]} in"
                        f" '{recipe.config_from}'; the models use different vocabularies (resize one to match first)"
                    )
                else:
                    problems.append(f"shape mismatch for {name!r}: {list(other.shape)} in '{alias}' vs {list(info.shape)} in '{recipe.config_from}'")
                ok = False
            elif not other.is_float:
                problems.append(f"tensor {name!r} is {other.dtype} in '{alias}' but floating point in '{recipe.config_from}'")
                ok = False
        if not ok:
            continue
        out_dtype = DTYPE_NAMES[TORCH_DTYPES[forced]] if forced else base.info(name).dtype
        edits = [[e for e in d.edits if e.applies_to(name, info.shape)] for d, _ in deltas]
        elementwise = recipe.combine.elementwise and all(e.elementwise for es in edits for e in es)
        tensors.append(TensorPlan(name, info.shape, out_dtype, True, edits, elementwise))

    if not problems:
        from weightx.delta_artifact import plan_compression

        more, more_notes = plan_compression(recipe, sources, tensors, recipe_dir)
        problems += more
        notes += more_notes
    for alias, src in sources.items():
        extra = [n for n in src.weight_map if n not in cfg.weight_map]
        if extra and alias != recipe.config_from:
            notes.append(f"{len(extra)} tensor(s) of '{alias}' are not in '{recipe.config_from}' and are left out (e.g. {extra[0]})")
    if not cfg.has_config:
        notes.append(f"'{recipe.config_from}' has no config.json: the output will hold weights only")
    if problems:
        raise PlanError(problems)
    return Plan(recipe, sources, out_path, tensors, split_shards(tensors, recipe.output.shard_bytes), notes)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def render_plan(plan: Plan) -> str:
    r = plan.recipe
    lines = [f"plan for {r.name or plan.out_path.name}", "inputs:"]
    for alias, src in plan.sources.items():
        role = "base" if alias == r.base else ("delta" if any(d.model == alias for d in r.deltas) else "config")
        n = len(src.weight_map)
        lines.append(f"  {alias:<12} {role:<6} {src.describe()}  ({n} tensors, {human_bytes(src.total_bytes)})")
    lines.append("deltas:")
    counts = plan.edit_counts()
    for d, c in zip(r.deltas, counts):
        edits = ", ".join(f"{e.describe()} on {c[e.op]} tensors" for e in d.edits) or "no edits"
        lines.append(f"  {d.model} − {r.base}  weight {d.weight:g}: {edits}")
    lines.append(f"combine: {r.combine.describe()}")
    edited = sum(t.edit for t in plan.tensors)
    dtypes = sorted({t.out_dtype for t in plan.tensors})
    lines.append(
        f"output: {plan.out_path}  format {r.output.format}, {len(plan.tensors)} tensors ({edited} computed,"
        f" {len(plan.tensors) - edited} copied), {plan.parameter_count:,} parameters, {', '.join(dtypes)}"
    )
    lines.append(f"        {human_bytes(plan.total_size)} in {len(plan.shards)} shard(s) of ≤ {human_bytes(r.output.shard_bytes)}")
    if r.output.format == "delta":
        from weightx.delta_artifact import render_compression

        lines += [f"        {line}" for line in render_compression(plan)]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


__all__ = ["Plan", "TensorPlan", "ShardPlan", "build_plan", "render_plan", "natural_key", "itemsize"]
