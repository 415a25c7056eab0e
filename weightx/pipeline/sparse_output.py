"""`output.format: delta` for sparse edits: tensors a sparsifying step leaves mostly unchanged are stored
as their changed positions and values (`weightx.formats.sparse`), everything else whole.

Which tensors: those where every delta has a sparsifying edit (`kept_fraction`: dare with k = 0,
magnitude, breadcrumbs, della) or the combine sparsifies (ties). How many entries change is known
only once computed, so planning shows estimates from the densities; the run computes each such
tensor (the same blocks as `format: dense`), spools its parts to a scratch file, then lays out the
shards: whole tensors stream through the engine into their own shards, sparse parts are copied from
the spool into theirs. A sparse tensor is kept only where it is smaller than storing it whole and
where rebuilding it through the engine's float32 path (base + (stored − base), rounded) gives the
stored bytes back (not so when the output cancels the base to below 2⁻¹⁶ of it); else it is
stored whole, recomputed (every step is deterministic). Memory: one tensor's changed positions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from weightx.formats import sparse
from weightx.formats.packing import pack_bits, packed_len
from weightx.io.safetensors import DTYPES, OutTensor, ShardWriter, itemsize, write_spooled
from weightx.pipeline.compute import Inputs, TensorComputer, TensorStats
from weightx.pipeline.engine import write_shards
from weightx.pipeline.plan import Plan, ShardPlan, TensorPlan, human_bytes, shard_names, split_shards
from weightx.pipeline.state import RunState
from weightx.recipe.model import Recipe


def expected_fraction(recipe: Recipe, t: TensorPlan) -> float | None:
    """The share of t's entries a run is expected to change (for plan sizes), or None when t is not
    stored sparsely: the combine sparsifies, or every delta has a sparsifying edit on t."""
    combine = t.combine or recipe.combine
    c = combine.kept_fraction()
    if c is not None:
        return min(1.0, c * len(t.edits))  # the union of the deltas' kept entries, at most
    per_delta = []
    for edits in t.edits:
        kept = [e.kept_fraction() for e in edits if e.kept_fraction() is not None]
        if not kept:
            return None
        per_delta.append(min(kept))
    return min(1.0, sum(per_delta)) if per_delta else None


def estimated_parts(t: TensorPlan, fraction: float) -> tuple[OutTensor, ...]:
    n = t.numel
    k = min(n, round(fraction * n))
    kind = sparse.position_kind(n, k)
    return tuple(OutTensor(f"{t.name}.{sfx}", dt, shape) for sfx, (dt, shape) in sparse.part_specs(t.shape, t.out_dtype, k, kind).items())


def plan_sparse(recipe: Recipe, tensors: list[TensorPlan]) -> tuple[list[str], list[str], list[TensorPlan]]:
    """(problems, notes, tensors): sparse candidates get estimated parts."""
    out, count = [], 0
    for t in tensors:
        f = expected_fraction(recipe, t) if t.edit and t.numel else None
        if f is None:
            out.append(t)
            continue
        count += 1
        out.append(dataclasses.replace(t, parts=estimated_parts(t, f)))
    if not count:
        return ["output.format: delta stores a compressing edit (bitdelta, ternary) or a sparse one (dare, magnitude,"
                " breadcrumbs, della, combine ties); this recipe has neither on any tensor: add one or use format: dense"], [], tensors
    return [], [f"format: delta stores {count} tensor(s) of sparse edits as changed positions and values; sizes are"
                " estimates from the densities until the run has counted them"], out


def _verified(values: torch.Tensor, base32: torch.Tensor, dtype: torch.dtype) -> bool:
    """Rebuilding through the engine's path (base + (stored − base) in float32, rounded) gives the bytes back."""
    if not values.numel():
        return True
    x = values.to(torch.float32)
    again = base32.add(x.sub(base32)).to(dtype)
    view = sparse.INT_VIEWS[values.element_size()]
    return bool(torch.equal(again.view(view), values.view(view)))


def write_sparse(plan: Plan, folder: Path, device: torch.device, run: RunState,
                 progress: Callable[[int], None] = lambda n: None) -> tuple[Plan, dict[str, TensorStats], dict[str, dict]]:
    """Write every shard of a sparse `format: delta` plan into `folder`. Returns the plan with the
    layout as written (its shards and the sparse tensors' real parts), the per-tensor stats (a sparse
    tensor's carry codec "sparse", k and positions) and per shard file its sha256 and size."""
    inputs = Inputs()
    computer = TensorComputer(plan, inputs, device, run=run)
    stats: dict[str, TensorStats] = {}
    stored: dict[str, TensorPlan] = {}  # sparse tensors as written: their real parts
    offsets: dict[str, int] = {}  # part name → offset in the spool
    spool = folder / ".sparse.spool"
    try:
        with open(spool, "wb") as f:
            for t in plan.tensors:
                if t.parts is None:
                    continue
                st = TensorStats()
                dtype = DTYPES[t.out_dtype]
                n, size = t.numel, itemsize(t.out_dtype)
                # The changed positions as a packed bitmap (n/8 bytes), the values straight to the spool:
                # memory stays small whatever the tensor's size. Blocks start at multiples of 8.
                mask = torch.zeros(packed_len(n), dtype=torch.uint8)
                start_of_values = f.tell()
                k, ok = 0, True
                for (start, count), out in zip(computer.ranges(t), computer.blocks(t, st)):
                    base32 = computer.load(plan.base, t, start, count)
                    pos = sparse.differing(out, base32.to(dtype))
                    vals = out[pos]
                    ok = ok and _verified(vals, base32[pos], dtype)
                    changed = torch.zeros(count, dtype=torch.bool)
                    changed[pos.cpu()] = True
                    mask[start // 8:start // 8 + packed_len(count)] = pack_bits(changed)
                    f.write(ShardWriter.raw(vals.cpu()))
                    k += pos.numel()
                if not ok or sparse.stored_nbytes(n, k, size) >= n * size:
                    f.seek(start_of_values)
                    f.truncate()
                    continue  # stored whole (recomputed by the engine below)
                kind = sparse.position_kind(n, k)
                code = mask if kind == "mask" else sparse.mask_to_index(mask, n, k)
                del mask
                values = OutTensor(f"{t.name}.values", t.out_dtype, (k,))
                positions = OutTensor(f"{t.name}.{kind}", "U8", (code.numel(),))
                offsets[values.name] = start_of_values
                offsets[positions.name] = f.tell()
                f.write(ShardWriter.raw(code))
                st.extra.update({"codec": "sparse", "k": k, "positions": kind, "changed_share": k / n if n else 0.0})
                stats[t.name] = st
                stored[t.name] = dataclasses.replace(t, parts=(values, positions))
                progress(values.nbytes + positions.nbytes)
        whole = [dataclasses.replace(t, parts=None) if t.parts is not None else t for t in plan.tensors if t.name not in stored]
        sparse_tensors = [stored[t.name] for t in plan.tensors if t.name in stored]
        groups = split_shards(whole, plan.recipe.output.shard_bytes) if whole else []
        groups += split_shards(sparse_tensors, plan.recipe.output.shard_bytes) if sparse_tensors else []
        shards = [ShardPlan(name, g.tensors) for name, g in zip(shard_names(len(groups)), groups)]
        as_written = [stored.get(u.name) or (dataclasses.replace(u, parts=None) if u.parts is not None else u) for u in plan.tensors]
        layout = dataclasses.replace(plan, tensors=tuple(as_written), shards=tuple(shards))
        written: dict[str, dict] = {}

        def done(sw: ShardWriter, _: dict) -> None:
            written[sw.path.name] = {"sha256": sw.sha256, "size": sw.total}

        dense_shards = [s for s in shards if all(t.name not in stored for t in s.tensors)]
        if dense_shards:
            stats.update(write_shards(layout, folder, device, progress, shards=dense_shards, on_shard=done, run=run))
        with open(spool, "rb") as f:
            for s in shards:
                if s in dense_shards:
                    continue
                writer = write_spooled(folder / s.filename, [o for t in s.tensors for o in t.parts], f, offsets)
                written[s.filename] = {"sha256": writer.sha256, "size": writer.total}
    finally:
        inputs.close()
        spool.unlink(missing_ok=True)
    return layout, stats, written


def render_sparse(plan: Plan) -> list[str]:
    sp = [t for t in plan.tensors if t.parts is not None and t.codec is None]
    if plan.recipe.output.format != "delta" or not sp:
        return []
    est = sum(o.nbytes for t in sp for o in t.parts)
    dense = sum(t.numel * itemsize(t.out_dtype) for t in sp)
    whole = sum(o.nbytes for t in plan.tensors if t.parts is None for o in t.outs)
    return [f"sparse: {len(sp)} tensor(s) ≈ {human_bytes(est)} (≈ 1/{dense / est:.1f} of storing them whole, {human_bytes(dense)};"
            " estimated from the densities)" if est else f"sparse: {len(sp)} tensor(s)",
            f"stored whole: {len(plan.tensors) - len(sp)} tensor(s), {human_bytes(whole)}",
            f"artifact ≈ {human_bytes(est + whole)}"]


def is_sparse(recipe: Recipe) -> bool:
    """A `format: delta` recipe without a compressing edit: its artifact stores sparse tensors."""
    return recipe.output.format == "delta" and not any(e.compresses for d in recipe.deltas for e in d.edits)


__all__ = ["expected_fraction", "is_sparse", "plan_sparse", "render_sparse", "write_sparse"]
