"""TIES over the whole model: `trim_scope: global` and `zero_sign: paper`, before any write.

The TIES paper's code (and MergeLM's) flattens each task vector over the whole model and trims it
there, and settles zero sums by the majority of the elected signs over the whole model. weightx
computes both without holding the model, in read passes over the edited tensors:

1. per delta, a histogram of the high 15 bits of |τ| (float32 bits order like the values);
2. per delta and tensor, how many entries lie above the k-th largest's bucket and the low 16 bits
   of those inside it, which pins the exact threshold v; `count: exact` keeps k = ⌊density·N⌋
   (≥ 1), the ties at v going to the lowest (tensor in plan order, flat index), like every
   weightx top-k; `count: reference` keeps everything ≥ the (int(N·density)+1)-th largest;
3. (`zero_sign: paper`) the trimmed, weighted (or, `elect: unweighted`, unweighted) deltas' sums,
   counting + and − over the model: zero sums elect the majority, − when tied.

Each tensor's share (its threshold, how many ties it keeps) and the election go to the run state;
the engine then computes each tensor whole. Memory: the deltas of the largest tensor.
"""

from __future__ import annotations

import time

import torch

from weightx.combine.ties import GlobalTies, Ties, TiesState, trim_and_mass, prepare_ties
from weightx.kernels.topk import Selection, keep_count, kth_bucket, reference_count
from weightx.pipeline.compute import Inputs, TensorComputer
from weightx.pipeline.plan import Plan, TensorPlan
from weightx.pipeline.state import RunState

ABS = 0x7FFFFFFF
HIGH = 1 << 15
LOW = 1 << 16


def _each(plan: Plan, tensors: list[TensorPlan], device: torch.device):
    """(tensor, [each delta after its edits, flat float32])."""
    inputs = Inputs()
    comp = TensorComputer(plan, inputs, device)
    try:
        for t in tensors:
            yield t, [comp.edited_delta(t, i).reshape(-1).contiguous() for i in range(len(plan.deltas))]
    finally:
        inputs.close()


def _global_trims(plan: Plan, ties: Ties, tensors: list[TensorPlan], device: torch.device) -> tuple[dict[str, list[Selection]], dict]:
    m = len(plan.deltas)
    high = [torch.zeros(HIGH, dtype=torch.int64, device=device) for _ in range(m)]
    total = 0
    for _, ds in _each(plan, tensors, device):
        total += ds[0].numel()
        for i, d in enumerate(ds):
            high[i] += torch.bincount(d.view(torch.int32).bitwise_and(ABS).bitwise_right_shift_(16), minlength=HIGH)
    k = [keep_count(ties.density, total) if ties.count == "exact" else reference_count(ties.density, total)] * m
    buckets = [kth_bucket(high[i].cpu(), k[i]) if 0 < k[i] < total else (0, 0) for i in range(m)]
    per: list[tuple[TensorPlan, list[tuple[int, torch.Tensor, torch.Tensor]]]] = []
    low = [torch.zeros(LOW, dtype=torch.int64) for _ in range(m)]
    for t, ds in _each(plan, tensors, device):
        row = []
        for i, d in enumerate(ds):
            mags = d.view(torch.int32).bitwise_and(ABS)
            hi = mags >> 16
            b = buckets[i][0]
            n_over = int(torch.count_nonzero(hi > b))
            lo, cnt = torch.unique(mags[hi == b].bitwise_and_(LOW - 1), return_counts=True)
            lo, cnt = lo.cpu().long(), cnt.cpu()
            low[i].index_add_(0, lo, cnt)
            row.append((n_over, lo, cnt))
        per.append((t, row))
    found: dict[str, list[Selection]] = {t.name: [] for t in tensors}
    record = {"parameters": total, "kept": [], "threshold": []}
    for i in range(m):
        if not 0 < k[i] < total:
            for t, _ in per:
                found[t.name].append(Selection(t.numel, t.numel if k[i] >= total else 0))
            record["kept"].append(min(k[i], total))
            record["threshold"].append(0.0)
            continue
        b, above = buckets[i]
        lo_v, above_lo = kth_bucket(low[i], k[i] - above)
        v = (b << 16) | lo_v
        ties_left = k[i] - above - above_lo
        kept = 0
        for t, row in per:
            n_over, lo, cnt = row[i]
            greater = n_over + int(cnt[lo > lo_v].sum())
            equal = int(cnt[lo == lo_v].sum())
            if ties.count == "reference" or v == 0:
                keep = equal  # every tie at v (keeping zeros changes nothing)
            else:
                keep = min(equal, ties_left)
                ties_left -= keep
            kept += greater + keep
            found[t.name].append(Selection(t.numel, greater + keep, v, keep, equal, {0: 0}, {0: equal}))
        record["kept"].append(kept)
        record["threshold"].append(float(torch.tensor([v], dtype=torch.int32).view(torch.float32)[0]))
    return found, record


def prepare(plan: Plan, device: torch.device, state: RunState) -> dict | None:
    """Before any writing: the whole-model trims and election of a TIES combine that asks for them
    (its `prepass()`), into `state`; returns the weightx.json record, or None."""
    ties = plan.recipe.combine
    if not isinstance(ties, Ties) or ties.prepass() != "global_statistics":
        return None
    t0 = time.perf_counter()
    tensors = [t for t in plan.tensors if t.edit]
    weights = [d.weight for d in plan.recipe.deltas]
    trims: dict[str, list[Selection]] | None = None
    record: dict = {"combine": "ties", "trim_scope": ties.trim_scope, "count": ties.count, "zero_sign": ties.zero_sign}
    if ties.trim_scope == "global":
        trims, found = _global_trims(plan, ties, tensors, device)
        record.update(found)
    minus = None
    if ties.zero_sign == "paper":
        plus = neg = 0
        for t, ds in _each(plan, tensors, device):
            if trims is not None:
                sels = trims[t.name]
            else:
                sels = prepare_ties(lambda ds=ds: [(0, ds)], t.numel, weights, ties.density, "positive", ties.count, ties.elect).trims
            mass = trim_and_mass(ds, weights, ties.density, None, TiesState(sels, None), 0, ties.elect)
            neg += int((mass < 0).sum())
            plus += int((mass > 0).sum())
        minus = plus <= neg  # a tie elects −, as the paper's code
        record.update({"elected_plus": plus, "elected_minus": neg, "zero_sums_elect": "-" if minus else "+"})
    record["seconds"] = round(time.perf_counter() - t0, 3)
    entries = {t.name: GlobalTies(tuple(trims[t.name]) if trims is not None else None, minus) for t in tensors}
    state.learn(ties, entries, "ties_global", record)
    return record
