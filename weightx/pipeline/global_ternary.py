"""`ternary: {scope: global}`: one threshold and one scale over every tensor the edit selects.

ComPEFT's reference flattens the selected state dict (keys sorted by name) into one vector, keeps its
top-k |τ| and scales them all by α·σ of that vector. weightx computes the same selection without
holding the model, in two read passes before writing:

1. per tensor: a histogram of the high 15 bits of |δ| (float32 bits order like the values), and
   its count, mean and variance (combined exactly across tensors, Chan et al.);
2. the histogram bucket holding the global k-th largest is known; per tensor: how many entries lie
   above it and, for the entries inside it, a histogram of the low 16 bits.

That pins the exact threshold v (float32 bits) and how many entries equal to v to keep; those ties
go to the lowest (tensor in plan order, flat index), like the per-tensor rule. Each tensor then
keeps |δ| > v plus its share of ties, so its kept count k_t (and part sizes) is known before the
writer lays out shards. k = ⌊density·N⌋ over all N selected entries; exact zeros are never kept.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from weightx.edits.ternary import ABS_BITS, GlobalSelection, Ternary
from weightx.kernels.topk import keep_count, kth_bucket
from weightx.pipeline.compression import with_parts
from weightx.pipeline.compute import Inputs, TensorComputer
from weightx.pipeline.plan import Plan, TensorPlan
from weightx.pipeline.state import RunState

HIGH = 1 << 15
LOW = 1 << 16


def global_edits(plan: Plan) -> list[tuple[int, Ternary]]:
    return [(i, e) for i, d in enumerate(plan.recipe.deltas) for e in d.edits if e.prepass() == "global_statistics"]


def _deltas(plan: Plan, i: int, tensors: list[TensorPlan], device: torch.device) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """Each tensor's delta after the edits before the ternary one, flat float32 on `device`."""
    inputs = Inputs()
    comp = TensorComputer(plan, inputs, device)
    try:
        for t in tensors:
            d = comp.edited_delta(t, i, len(t.edits[i]) - 1)
            yield t, d.reshape(-1).to(torch.float32).contiguous()
    finally:
        inputs.close()


def _value(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def statistics(plan: Plan, i: int, edit: Ternary, device: torch.device, state: RunState) -> dict:
    """Run both passes for one global ternary edit; put the per-tensor selection and scale in `state`."""
    t0 = time.perf_counter()
    tensors = [t for t in plan.tensors if t.edit and t.edits[i] and t.edits[i][-1] is edit]
    high = torch.zeros(HIGH, dtype=torch.int64, device=device)
    count, mean, m2 = 0, 0.0, 0.0
    for _, d in _deltas(plan, i, tensors, device):
        mags = d.view(torch.int32).bitwise_and(ABS_BITS)
        high += torch.bincount(mags.bitwise_right_shift_(16), minlength=HIGH)
        n = d.numel()
        if n:
            # the per-tensor mode's own statistics (torch's std, ddof 1), combined exactly across tensors
            sd, m = (float(d.std()) if n > 1 else 0.0), float(d.mean())
            var = sd * sd
            total = count + n
            delta = m - mean
            m2 += var * (n - 1) + delta * delta * count * n / total
            mean += delta * n / total
            count = total
    k = keep_count(edit.density, count)
    b, above = kth_bucket(high, k) if k else (0, 0)

    per: list[tuple[TensorPlan, int, float, torch.Tensor, torch.Tensor]] = []  # t, above, Σ|δ| above, lo values, counts
    low = torch.zeros(LOW, dtype=torch.int64)
    for t, d in _deltas(plan, i, tensors, device):
        mags = d.view(torch.int32).bitwise_and(ABS_BITS)
        hi = mags >> 16
        over = hi > b
        n_over = int(torch.count_nonzero(over))
        s_over = float(d[over].abs().sum(dtype=torch.float64)) if edit.scale == "mean_abs_kept" else 0.0
        lo, cnt = torch.unique(mags[hi == b].bitwise_and_(LOW - 1), return_counts=True)
        lo, cnt = lo.cpu().long(), cnt.cpu()
        low.index_add_(0, lo, cnt)
        per.append((t, n_over, s_over, lo, cnt))
    lo_v, above_lo = kth_bucket(low, k - above) if k else (0, 0)
    v = (b << 16) | lo_v
    ties_left = (k - above - above_lo) if v > 0 else 0

    found: dict[str, tuple[int, int, int]] = {}
    kept_sum, kept = 0.0, 0
    for t, n_over, s_over, lo, cnt in per:
        greater = n_over + int(cnt[lo > lo_v].sum())
        equal = int(cnt[lo == lo_v].sum())
        ties = min(equal, ties_left) if v > 0 else 0
        ties_left -= ties
        found[t.name] = (v, ties, greater + ties)
        kept += greater + ties
        if edit.scale == "mean_abs_kept":
            inside = [(int(x), int(c)) for x, c in zip(lo.tolist(), cnt.tolist()) if x > lo_v]
            kept_sum += s_over + sum(c * _value((b << 16) | x) for x, c in inside) + ties * _value(v)
    if edit.scale == "std":
        s = (m2 / (count - 1)) ** 0.5 if count > 1 else 0.0
    else:
        s = kept_sum / kept if kept else 0.0
    scale = edit.alpha * s
    record = {
        "edit": "ternary", "scope": "global", "density": edit.density, "scale": edit.scale,
        "tensors": len(tensors), "parameters": count, "kept": kept,
        "threshold": _value(v), "scale_value": float(torch.tensor(edit.alpha * s, dtype=torch.float32)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    state.learn(edit, {name: GlobalSelection(*sel, scale) for name, sel in found.items()}, "ternary_global", record)
    return record


def prepare(plan: Plan, device: torch.device, state: RunState) -> Plan:
    """Before any writing: compute every global ternary edit's selection into `state`; return the
    plan whose part sizes (which depended on it) and shard layout follow from it."""
    edits = global_edits(plan)
    if not edits:
        return plan
    for i, edit in edits:
        statistics(plan, i, edit, device, state)
    if plan.recipe.output.format != "delta":
        return plan
    return plan.with_tensors([
        with_parts(t, t.codec, state.entry(t.codec, t.name)) if t.codec is not None and t.codec.prepass() == "global_statistics" else t
        for t in plan.tensors])
