"""Planning: resolve a recipe's inputs and build its plan from their headers alone.

Nothing here reads tensor data. All problems are collected and raised together as a PlanError, so
a user fixes a recipe in one round trip instead of one error per run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from weightx.errors import InputError, InputNotFoundError, PlanError, UsageError
from weightx.io.files import copyable, read_regular
from weightx.edits.base import matches
from weightx.io.names import describe_rules, matched_names
from weightx.io.output import CONFIG_FILES
from weightx.io.quantized import dequantized_sources
from weightx.io.safetensors import DTYPE_NAMES, TORCH_DTYPES
from weightx.io.sources import Source, model_type, resolve
from weightx.pipeline.compression import plan_compression, render_compression
from weightx.pipeline.lora import ADAPTER_FILE, plan_lora, render_lora
from weightx.pipeline.vocab import plan_vocab, row_maps
from weightx.pipeline.plan import VOCAB_NAMES, Plan, ShardPlan, TensorPlan, human_bytes, natural_key, outputs_are_columns, split_shards
from weightx.recipe.model import Recipe
from weightx.recipe.varying import layer_positions


MAX_CONFIG_BYTES = 16 << 20


def config_problem(root: Path) -> str | None:
    """Why `root/config.json` cannot be the output's config (one line), or None."""
    path = root / "config.json"
    try:
        if not copyable(path, root):
            return None
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return f"{path} is larger than 16 MB; it is not a model config"
        doc = json.loads(read_regular(path).decode("utf-8"))
    except InputError as e:
        return str(e)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:120]
        return f"{path} is not valid JSON ({why}); re-download the model or fix the file"
    if not isinstance(doc, dict):
        return f"{path} is not a JSON object; it is not a model config: re-download the model or fix the file"
    return None


def copy_problem(path: Path, root: Path) -> str | None:
    try:
        copyable(path, root)
    except InputError as e:
        return str(e)
    return None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def resolve_sources(recipe: Recipe, recipe_dir: Path | None = None) -> dict[str, Source]:
    """Resolve every model the recipe uses; collect all failures before raising."""
    used = {recipe.base, recipe.config_from, *(d.model for d in recipe.deltas), *(d.base for d in recipe.deltas if d.base)}
    sources, errors = {}, []
    for alias, spec in recipe.models.items():
        if alias not in used:
            continue
        try:
            sources[alias] = resolve(alias, spec, recipe_dir, allow_pickle=recipe.allow_pickle)
        except InputError as e:
            errors.append(e)
    if errors:  # one type however many failed: not found only if every one of them is missing
        kind = InputNotFoundError if all(isinstance(e, InputNotFoundError) for e in errors) else InputError
        raise kind([p for e in errors for p in e.problems])
    return sources


def build_plan(recipe: Recipe, output: str | Path | None = None, recipe_dir: Path | None = None) -> Plan:
    out = output or recipe.output.path
    if not out:
        raise UsageError("output.path is not set: add `output: {path: ...}` to the recipe or pass --output PATH")
    # The parent is resolved, the last component is not: a symlinked output path is refused when
    # the run starts (io.output.check_replaceable), never followed into another folder.
    absolute = Path(os.path.abspath(Path(out).expanduser()))
    out_path = absolute.parent.resolve() / absolute.name if absolute.name else absolute
    if not absolute.name:
        raise UsageError(f"output.path {out} is the file system root; choose a folder for the output")
    blocker = next((p for p in reversed(out_path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"output.path {out_path} is under {blocker}, which is a file, not a folder; choose another output path")
    sources = resolve_sources(recipe, recipe_dir)
    problems: list[str] = []
    notes: list[str] = []

    if recipe_dir is not None and _inside(Path(os.path.abspath(recipe_dir)).resolve(), out_path):
        problems.append(f"output.path {out_path} holds the recipe's own folder ({recipe_dir}); write elsewhere")
    for alias, src in sources.items():
        root = src.root if src.kind != "file" else next(iter(src.headers.values())).path
        if _inside(out_path, root):
            problems.append(f"output.path {out_path} is {'the same as' if out_path == root else 'inside'} input '{alias}' ({root}); write elsewhere")
        elif _inside(root, out_path):
            problems.append(f"input '{alias}' ({root}) is inside output.path {out_path}; write elsewhere")

    quantized = dequantized_sources(sources, notes)
    if quantized:
        raise PlanError(quantized)  # nothing else about a quantized input is worth reading
    cfg = sources[recipe.config_from]
    dropped = lambda name: bool(recipe.output.drop) and matches(name, recipe.output.drop)  # noqa: E731
    wanted = {n for n in cfg.weight_map if not dropped(n)}
    for alias in dict.fromkeys([recipe.base] + [a for d in recipe.deltas for a in (d.model, d.base) if a]):
        src = sources[alias]
        if alias == recipe.config_from or src.artifact is not None:
            continue
        found = matched_names(src, wanted)
        if found is not None:  # the same tensors under other names: read them under the config model's
            sources[alias], mapped = found
            notes.append(f"'{alias}' names its tensors differently from '{recipe.config_from}': read with"
                         f" {describe_rules(sources[alias].renames)} ({mapped} tensors; recorded in weightx.json)")
    base = sources[recipe.base]
    deltas = [(d, sources[d.model]) for d in recipe.deltas]
    # Transplanted deltas (`deltas.i.base`): their own bases must match names and shapes too.
    own_bases = [(a, sources[a]) for a in dict.fromkeys(d.base for d in recipe.deltas if d.base and d.base != recipe.base)]
    forced = recipe.output.dtype
    more, vocab_notes, vocab = plan_vocab(recipe, sources)
    if more:
        raise PlanError(more)
    notes += vocab_notes
    aligned = list(dict.fromkeys([recipe.base] + [d.model for d in recipe.deltas]))
    kind = model_type(cfg)
    tensors: list[TensorPlan] = []
    positions = layer_positions(cfg.weight_map) if recipe.varying else {}
    missing: dict[str, list[str]] = {}
    for name in sorted(cfg.weight_map, key=natural_key):
        if dropped(name):
            continue
        info = cfg.info(name)
        if not info.is_float:
            tensors.append(TensorPlan(name, info.shape, info.dtype, edit=False))
            continue
        rows = None
        if vocab is not None and VOCAB_NAMES.search(name) and len(info.shape) == 2:
            have = [(a, sources[a]) for a in aligned if name in sources[a].weight_map]
            wrong = [a for a, s in have if s.info(name).shape[1:] != info.shape[1:]]
            if len(have) == len(aligned) and not wrong:
                total, maps = row_maps(vocab, aligned, [s.info(name).shape[0] for _, s in have])
                rows = dict(zip(aligned, maps))
                info = dataclasses.replace(info, shape=(total, info.shape[1]))
        ok = True
        for alias, src in [(recipe.base, base)] + [(d.model, s) for d, s in deltas] + own_bases:
            if name not in src.weight_map:
                missing.setdefault(alias, []).append(name)
                ok = False
                continue
            other = src.info(name)
            if rows is not None:
                pass  # rows aligned by token; the hidden size was checked above
            elif other.shape != info.shape:
                if VOCAB_NAMES.search(name) and other.shape[1:] == info.shape[1:] and other.shape[:1] != info.shape[:1]:
                    problems.append(
                        f"vocab-size mismatch: {name!r} has {other.shape[0]} rows in '{alias}' but {info.shape[0]} in"
                        f" '{recipe.config_from}'; the models use different vocabularies: add `tokenizer: {{source: union}}` (or base, or a"
                        " model's alias) to align the rows by token"
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
        if out_dtype in ("F8_E4M3", "F8_E5M2"):  # a dequantized FP8 base: written in bfloat16 (a plan note says so)
            out_dtype = "BF16"
        weights, combine, all_edits = None, None, tuple(d.edits for d, _ in deltas)
        if recipe.varying:
            try:
                weights, all_edits, combine = recipe.resolve(name, positions[name])
            except KeyError:
                problems.append(f"tensor {name!r} matches no filter of a parameter; end each filter list with an entry without filter")
                continue
            except ValueError as e:  # an interpolated value the parameter refuses
                problems.append(f"tensor {name!r}: {str(e).splitlines()[-1].strip()}")
                continue
            why = combine.check(list(weights))
            if why:
                problems.append(f"tensor {name!r}: {why}")
                continue
        edits = tuple(tuple(e for e in es if e.applies_to(name, info.shape)) for es in all_edits)
        elementwise = (combine or recipe.combine).elementwise and all(e.elementwise for es in edits for e in es)
        tensors.append(TensorPlan(name, info.shape, out_dtype, True, edits, elementwise, weights=weights, combine=combine, rows=rows,
                                  columns=outputs_are_columns(kind, name, info.shape)))

    grown = [t for t in tensors if t.rows is not None and t.shape[0] != base.info(t.name).shape[0]]
    if grown and recipe.output.format != "dense":
        problems.append(f"tokenizer: {grown[0].name} gets {grown[0].shape[0]} rows where the base has {base.info(grown[0].name).shape[0]};"
                        f" a {recipe.output.format} output is applied to the base, so it must keep the base's rows: use format: dense"
                        " or tokenizer.source: base")
    for alias, names in missing.items():
        src = sources[alias]
        if len(names) <= 3:
            problems += [f"tensor {n!r} is missing from '{alias}' ({src.describe()})" for n in names]
            continue
        own = sorted((n for n in src.weight_map if n not in cfg.weight_map), key=natural_key)
        like = f"; its own names look like {own[0]!r}" if own else ""
        problems.append(f"{len(names)} tensors of '{recipe.config_from}' are missing from '{alias}' ({src.describe()}), e.g. {names[0]!r}"
                        f"{like}: no consistent prefix maps one onto the other; check that both are the same architecture")
    distill_data = None
    if not problems:
        planned = plan_compression(recipe, sources, tensors, recipe_dir)
        problems += planned.problems
        notes += planned.notes
        tensors, distill_data = planned.tensors, planned.distill_data
    if not problems and recipe.output.format == "lora":
        more, lora_notes, tensors = plan_lora(recipe, kind, tensors, cfg)
        problems += more
        notes += lora_notes
    for alias, src in sources.items():
        extra = [n for n in sorted(src.weight_map, key=natural_key) if n not in cfg.weight_map and not dropped(n)]
        if not extra or alias == recipe.config_from or len(missing.get(alias, ())) > 3:
            continue  # (many missing: the summary line above already says the names differ)
        lost = [n for n in extra if src.info(n).is_float]
        if lost and any(d.model == alias for d in recipe.deltas):  # a fine-tune's own weights: never dropped silently
            problems.append(f"'{alias}' has {len(lost)} tensor(s) that '{recipe.config_from}' (output.config_from) lacks, e.g."
                            f" {lost[0]}, so the output would leave them out: set output.config_from: {alias} to keep them,"
                            f" or output.drop: [{_pattern(lost)!r}] to leave them out knowingly")
        else:
            notes.append(f"{len(extra)} tensor(s) of '{alias}' are not in '{recipe.config_from}' and are left out (e.g. {extra[0]})")
    dtypes = {alias: _main_dtype(src) for alias, src in sources.items() if src.artifact is None}
    if len(set(dtypes.values()) - {None}) > 1 and not forced and recipe.output.format != "lora":
        listed = ", ".join(f"{a}: {d}" for a, d in dtypes.items() if d)
        notes.append(f"the inputs' dtypes differ ({listed}): each output tensor takes the base's dtype ({dtypes.get(recipe.base)});"
                     " set output.dtype to choose")
    notes += list(recipe.notes)
    if recipe.combine.prepass() == "global_statistics":
        passes = (2 if recipe.combine.trim_scope == "global" else 0) + (recipe.combine.zero_sign == "paper")  # type: ignore[attr-defined]
        notes.append(f"{recipe.combine.describe()} works over the whole model: {passes} read pass(es) before writing")
        if any(p.label.startswith("combine.") for p in recipe.varying):
            problems.append("a TIES combine over the whole model (trim_scope: global or zero_sign: paper) takes one density; remove its gradient or filters")
    if not cfg.has_config:
        others = [a for a, s in sources.items() if s.has_config and a != recipe.config_from]
        if others and recipe.output.format == "dense":  # the output would not load, and a config is at hand
            default = " (by default it is the last delta's model)" if recipe.output.config_from is None else ""
            problems.append(f"'{recipe.config_from}' ({cfg.describe()}) has no config.json{default}, so the output would not load;"
                            f" set output.config_from: {others[0]}, which has one")
        else:
            notes.append(f"'{recipe.config_from}' has no config.json: the output will hold weights only")
    else:  # found now, not after all the compute when the files are copied
        found = [config_problem(cfg.root)] + [copy_problem(cfg.root / n, cfg.root) for n in CONFIG_FILES]
        problems += [why for why in dict.fromkeys(found) if why]
    if problems:
        raise PlanError(problems)
    shards = ((ShardPlan(ADAPTER_FILE, tuple(tensors)),) if recipe.output.format == "lora"
              else tuple(split_shards(tensors, recipe.output.shard_bytes)))
    return Plan(recipe, sources, out_path, tuple(tensors), shards, tuple(notes), distill_data, recipe_dir, vocab=vocab)


def _pattern(names: list[str]) -> str:
    """A glob naming the given tensors: the name itself, or the common prefix plus `*`."""
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    return f"{prefix}*" if prefix else "*"


def _main_dtype(src: Source) -> str | None:
    """The most common floating dtype of a source's tensors (from headers)."""
    counts: dict[str, int] = {}
    for name in src.weight_map:
        info = src.info(name)
        if info.is_float:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.get) if counts else None


def _resolved_values(plan: Plan, label: str) -> list[float]:
    """The values a varying parameter took over the planned tensors."""
    path = label.split(".")
    out = []
    for t in plan.tensors:
        if not t.edit:
            continue
        if path[0] == "combine":
            out.append(float(getattr(t.combine, path[-1])))
        elif path[2] == "weight":
            out.append(float(t.weights[int(path[1])]))
        else:
            e = next((e for e in t.edits[int(path[1])] if e.op == path[4]), None)
            if e is not None:
                out.append(float(getattr(e, path[-1])))
    return out


def render_plan(plan: Plan) -> str:
    r = plan.recipe
    lines = [f"plan for {r.name or plan.out_path.name}", "inputs:"]
    for alias, src in plan.sources.items():
        role = ("base" if alias == r.base else "delta" if any(d.model == alias for d in r.deltas)
                else "base·δ" if any(d.base == alias for d in r.deltas) else "config")
        n = len(src.weight_map)
        lines.append(f"  {alias:<12} {role:<6} {src.describe()}  ({n} tensors, {human_bytes(src.total_bytes)})")
    lines.append("deltas:")
    counts = plan.edit_counts()
    varied = {p.label.split(".")[1] if p.label.startswith("deltas.") else "combine" for p in r.varying}
    for i, (d, c) in enumerate(zip(r.deltas, counts)):
        edits = ", ".join(f"{e.describe()} on {c[e.op]} tensors" for e in d.edits) or "no edits"
        mark = "  (first value shown; it varies by tensor, see below)" if str(i) in varied else ""
        onto = f" (onto {r.base})" if d.base and d.base != r.base else ""
        lines.append(f"  {d.model} − {d.base or r.base}{onto}  weight {d.weight:g}: {edits}{mark}")
    mark = "  (first value shown; it varies by tensor, see below)" if "combine" in varied else ""
    lines.append(f"combine: {r.combine.describe()}{mark}")
    for p in r.varying:
        values = sorted({round(v, 6) for v in _resolved_values(plan, p.label)})
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", …" if len(values) > 8 else "")
        lines.append(f"  {p.label} varies by tensor: {len(values)} value(s) ({shown})")
    edited = sum(t.edit for t in plan.tensors)
    dtypes = sorted({t.out_dtype for t in plan.tensors})
    lines.append(
        f"output: {plan.out_path}  format {r.output.format}, {len(plan.tensors)} tensors ({edited} computed,"
        f" {len(plan.tensors) - edited} copied), {plan.parameter_count:,} parameters, {', '.join(dtypes)}"
    )
    lines.append(f"        {human_bytes(plan.total_size)} in {len(plan.shards)} shard(s) of ≤ {human_bytes(r.output.shard_bytes)}")
    lines += [f"        {line}" for line in render_compression(plan) + render_lora(plan)]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
