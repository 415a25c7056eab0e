"""Planning compressed deltas: artifact inputs, compressing edits and `output.format: delta`.

Runs inside planning (`weightx.pipeline.planner`), from headers only: which tensors a codec
encodes, the parts each writes (their sizes are known before any compute), and the checks that
make a compressing recipe meaningful. Sizes for `weightx plan` come from here too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from weightx.edits.base import CodecEdit, Prepass, is_layer_weight
from weightx.errors import InputError
from weightx.io.artifact import base_mismatch
from weightx.io.safetensors import OutTensor
from weightx.io.sources import Source, model_type
from weightx.pipeline.distill import plan_distill
from weightx.pipeline.plan import COLUMN_MODELS, VOCAB_NAMES, Plan, TensorPlan, human_bytes
from weightx.pipeline.sparse_output import plan_sparse, render_sparse
from weightx.recipe.model import Recipe

BF16_BYTES = 2


@dataclass
class Compression:
    """What compression planning found: problems, notes, the tensors (compressed ones with their
    codec and parts) and the distillation data file."""

    problems: list[str]
    notes: list[str]
    tensors: list[TensorPlan]
    distill_data: Path | None = None


def with_parts(t: TensorPlan, codec: CodecEdit, run: object = None) -> TensorPlan:
    """`t` encoded by `codec`: a new plan entry whose outputs are the codec's parts."""
    shape = t.shape[:-2] + (t.shape[-1], t.shape[-2]) if t.columns and codec.per_row() and len(t.shape) >= 2 else t.shape
    specs = codec.part_specs(shape, run)
    return dataclasses.replace(t, codec=codec, parts=tuple(OutTensor(f"{t.name}.{sfx}", dt, shape) for sfx, (dt, shape) in specs.items()))


def last_edit_problems(recipe: Recipe, tensors: list[TensorPlan], prepass: Prepass, what: str) -> list[str]:
    """An edit whose pre-run phase sees the delta after the edits before it must be applied last."""
    problems = []
    for i, d in enumerate(recipe.deltas):
        for e in d.edits:
            if e.prepass() != prepass:
                continue
            bad = next((t.name for t in tensors if t.edit and any(x is e for x in t.edits[i]) and t.edits[i][-1] is not e), None)
            if bad:
                problems.append(f"{what} must be the last edit applied to a tensor, but not for {bad}")
    return problems


def plan_compression(recipe: Recipe, sources: dict[str, Source], tensors: list[TensorPlan],
                     recipe_dir: Path | None) -> Compression:
    """Check compressing edits, artifact inputs and `format: delta`; plan compressed tensors' parts.

    A base that is certainly not an artifact's base raises InputError at once (one line).
    """
    problems: list[str] = []
    notes: list[str] = []
    delta_aliases = [d.model for d in recipe.deltas]
    for alias, src in sources.items():
        art = src.artifact
        if art is None:
            continue
        if alias == recipe.base or any(d.base == alias for d in recipe.deltas):
            problems.append(f"'{alias}' is a weightx delta artifact, which cannot be a base; use the model it was made"
                            f" against as base and list '{alias}' under deltas to reconstruct it")
        elif alias in delta_aliases:
            against = {recipe.delta_base(i) for i, d in enumerate(recipe.deltas) if d.model == alias}
            for b in sorted(against):
                why = base_mismatch(alias, art, b, sources[b])
                if why:
                    raise InputError(why)
            counts: dict[str, int] = {}
            for e in art.codecs.values():
                counts[e["codec"]] = counts.get(e["codec"], 0) + 1
            what = ", ".join(f"{op} on {n} tensors" for op, n in counts.items()) or "no compressed tensors"
            notes.append(f"'{alias}' is a weightx delta artifact ({what}); base '{', '.join(sorted(against))}' must be the model it"
                         " was made against: shard names and sizes match, sha256 is compared as the run hashes it")

    edits = [e for d in recipe.deltas for e in d.edits]
    compressing = [e for e in edits if e.compresses]
    if any(e.per_row() and e.prepass() == "distill" for e in compressing) and model_type(sources[recipe.config_from]) in COLUMN_MODELS:
        problems.append("bitdelta group: row with distill: this model stores outputs as columns (Conv1D or stacked experts),"
                        " which distillation does not handle yet; use group: tensor or remove distill")
    result = Compression(problems, notes, list(tensors))
    if any(e.prepass() == "global_statistics" for e in edits):
        problems += last_edit_problems(recipe, tensors, "global_statistics", "ternary with scope: global")
        notes.append("ternary scope: global sizes are estimates until its statistics pass (two extra reads"
                     " of the selected tensors) has run; the total compressed size changes little")
    distilled = [e for e in edits if e.prepass() == "distill"]
    if distilled:
        more, result.distill_data = plan_distill(recipe, sources, distilled, recipe_dir)
        problems += more + last_edit_problems(recipe, tensors, "distill", "bitdelta with distill")

    if recipe.output.format != "delta":
        return result
    if not compressing:  # sparse edits, stored as changed positions and values
        more, sparse_notes, result.tensors = plan_sparse(recipe, list(tensors))
        problems += more
        notes += sparse_notes
        return result
    if len(recipe.deltas) != 1:
        problems.append(f"output.format: delta stores one compressed delta, but the recipe has {len(recipe.deltas)};"
                        " merge with format: dense, or compress each model in its own recipe")
    elif recipe.deltas[0].weight != 1.0:
        problems.append(f"output.format: delta stores the delta itself; deltas.0.weight is {recipe.deltas[0].weight:g}:"
                        f" use weight 1 and put `- scale: {{factor: {recipe.deltas[0].weight:g}}}` before the compressing edit")
    if recipe.combine.op not in ("sum", "mean"):
        problems.append(f"output.format: delta stores one delta; combine '{recipe.combine.op}' does not apply (use sum)")
    if problems:
        return result

    names = {t.name for t in tensors}
    misplaced: dict[str, list[str]] = {}
    for k, t in enumerate(tensors):
        if not t.edit:
            continue
        applied = t.edits[0]
        where = [i for i, e in enumerate(applied) if e.compresses]
        if not where:
            continue
        if where != [len(applied) - 1]:
            misplaced.setdefault(applied[where[0]].op, []).append(t.name)
            continue
        t = result.tensors[k] = with_parts(t, applied[-1])
        clash = [p.name for p in t.parts if p.name in names]
        if clash:
            problems.append(f"tensor {clash[0]!r} exists in the model and would collide with a part of compressed {t.name!r}")
    for op, where in misplaced.items():
        problems.append(f"{op} must be the last edit applied to a tensor (it quantises the delta), but not for"
                        f" {len(where)} tensor(s), e.g. {where[0]}; move it to the end of deltas.0.edits")
    if not problems and not any(t.codec is not None for t in result.tensors):
        ops = ", ".join(sorted({e.op for e in compressing}))
        problems.append(f"{ops} matches no tensor of the model, so nothing would be compressed; check its include patterns")
    return result


def compression_summary(plan: Plan) -> dict:
    """Sizes from the plan alone: compressed tensors against their bf16 delta, and the whole artifact."""
    comp = [t for t in plan.tensors if t.parts is not None]  # a codec's parts, or a sparse tensor's
    comp_params = sum(t.numel for t in comp)
    comp_bytes = sum(o.nbytes for t in comp for o in t.parts)
    whole_bytes = sum(o.nbytes for t in plan.tensors if t.parts is None for o in t.outs)
    dense_bf16 = plan.parameter_count * BF16_BYTES
    by_op: dict[str, int] = {}
    for t in comp:
        op = t.codec.op if t.codec is not None else "sparse"
        by_op[op] = by_op.get(op, 0) + 1
    return {
        "compressed_tensors": len(comp),
        "compressed_parameters": comp_params,
        "compressed_bytes": comp_bytes,
        "compressed_bf16_delta_bytes": comp_params * BF16_BYTES,
        "compressed_ratio": (comp_params * BF16_BYTES / comp_bytes) if comp_bytes else None,
        "whole_tensors": len(plan.tensors) - len(comp),
        "whole_bytes": whole_bytes,
        "artifact_bytes": comp_bytes + whole_bytes,
        "dense_bf16_delta_bytes": dense_bf16,
        "ratio": dense_bf16 / (comp_bytes + whole_bytes) if comp_bytes + whole_bytes else None,
        "ops": by_op,
    }


def matrix_share(plan: Plan) -> tuple[int, int]:
    """(parameters compressed, parameters of all layer weights, `weightx.edits.base.is_layer_weight`):
    embeddings, lm_head, norms, biases and routers are left whole on purpose and not counted."""
    def layer(t: TensorPlan) -> bool:
        return is_layer_weight(t.name, t.shape) and not VOCAB_NAMES.search(t.name)

    total = sum(t.numel for t in plan.tensors if t.edit and layer(t))
    done = sum(t.numel for t in plan.tensors if t.codec is not None and layer(t))
    return done, total


def render_compression(plan: Plan) -> list[str]:
    if plan.recipe.output.format != "delta" or not any(t.codec is not None for t in plan.tensors):
        return render_sparse(plan)
    s = compression_summary(plan)
    done, total = matrix_share(plan)
    share = [f"covers {100 * done / total:.1f}% of the model's matrix parameters (2-D and stacked 3-D layer weights;"
             " embeddings, lm_head, biases and routers are not counted)" + (": below 90 %, check the edit's include patterns" if done < 0.9 * total else "")] if total else []
    ops = ", ".join(f"{op} on {n}" for op, n in s["ops"].items())
    return [
        f"compressed: {ops} tensor(s), {s['compressed_parameters']:,} parameters -> {human_bytes(s['compressed_bytes'])}"
        f" = 1/{s['compressed_ratio']:.2f} of their bf16 delta ({human_bytes(s['compressed_bf16_delta_bytes'])})",
        f"stored whole: {s['whole_tensors']} tensor(s), {human_bytes(s['whole_bytes'])}"
        f" (the fine-tuned values: embeddings, lm_head, norms unless included)",
        f"artifact: {human_bytes(s['artifact_bytes'])} = 1/{s['ratio']:.2f} of the model's dense bf16 delta"
        f" ({human_bytes(s['dense_bf16_delta_bytes'])})",
    ] + share


