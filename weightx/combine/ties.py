"""TIES merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (arXiv 2306.01708).
Per tensor, for deltas τ_t with weights w_t:
1. trim: keep the top-`density` fraction of |τ_t| (exact count, ties by lowest flat index; see
   `weightx.kernels.topk`). Per tensor (`trim_scope: tensor`, as mergekit and peft), or over the
   whole model per delta (`trim_scope: global`, as the paper's and MergeLM's code; a run-level
   pre-pass, `weightx.pipeline.global_ties`, ties broken by (tensor in plan order, flat index)).
   `count: reference` keeps the paper code's count instead: everything ≥ the (int(n·density)+1)-th
   largest |τ|, i.e. int(n·density)+1 entries plus every tie (its `topk_values_mask`).
2. weight: τ̂_t = w_t·τ_t. Weights are applied before the election (`elect: weighted`, as mergekit),
   so a weight scales a delta's say in the sign as well as its contribution; `elect: unweighted`
   elects from Σ τ_t (peft's `ties`; the paper has no weights).
3. elect: γ = sign(Σ_t τ̂_t) ("mass"). Where the sum is exactly 0, `zero_sign: positive` (the
   default) elects +1, as mergekit's `(sum >= 0)*2 - 1`; `zero_sign: majority` elects the sign held
   by most entries of this tensor (+1 if that is a tie too); `zero_sign: paper` the sign held by most
   entries of the whole model, and − when that is a tie, as the paper's code (its `resolve_zero_signs`
   gives 0 there, which its disjoint merge reads as −). `paper` is a run-level pre-pass too.
4. disjoint merge: over the entries whose sign agrees with γ (zeros never agree),
   `normalize: true` (default) gives Σ τ̂_t / Σ w_t (`divide: weights`, the weighted mean: mergekit's
   `ties`) or Σ τ̂_t / #agreeing (`divide: count`: the paper's and peft's disjoint mean);
   `normalize: false` gives the plain sum Σ τ̂_t (mergekit's `dare_ties` default). Entries where
   nothing agrees are 0.
5. scale: multiply by `scale` (the paper's λ, mergekit's `lambda`; default 1).
With `dare` edits on the deltas first this is DARE-TIES (MergeLM: DARE, then TIES).
The paper's code is `trim_scope: global, count: reference, zero_sign: paper, elect: unweighted,
divide: count` with unit weights; peft's is `elect: unweighted, divide: count`.

Streaming: with `trim_scope: tensor` the only tensor-wide facts are each delta's trim threshold
(and, for `majority`, the sign counts); `prepare` gathers them in pre-passes over blocks
(`weightx.kernels.topk.select_blocks`), after which every step is elementwise and the engine
computes the tensor in blocks, bit for bit equal. With `trim_scope: global` the thresholds come from
the run state and each tensor is computed whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import field_validator

from weightx.combine.base import CombineConfig
from weightx.edits.base import Prepass, TensorContext
from weightx.edits.magnitude import check_density
from weightx.kernels.topk import (Blocks, Selection, Workspace, each_block, keep_count, reference_count, select_blocks, trim_,
                                  trim_block_, with_ties)

PAPER = "https://arxiv.org/abs/2306.01708"


def ties(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    density: float,
    zero_sign: Literal["positive", "majority", "paper"] = "positive",
    normalize: bool = True,
    scale: float = 1.0,
    state: "TiesState | None" = None,
    start: int = 0,
    count: Literal["exact", "reference"] = "exact",
    elect: Literal["weighted", "unweighted"] = "weighted",
    divide: Literal["weights", "count"] = "weights",
    minus: bool | None = None,
) -> torch.Tensor:
    """TIES over same-shaped float32 deltas; the deltas are modified in place.

    With `state` (from `prepare_ties`, or the run's global selections as a whole-tensor state) the
    deltas are the block at flat index `start` of each whole tensor, and the result is that block
    of the whole-tensor result, bit for bit. `state.minus` None: the election for a zero sum is
    this tensor's own (`positive` or `majority`). Temporaries (tensor- or block-sized): one float32
    (the mass, then the divisor) and one int32."""
    deltas = [d.contiguous() for d in deltas]
    if state is None and count == "reference":  # the whole tensor as one block, reference thresholds
        flat = [d.view(-1) for d in deltas]
        state = TiesState([with_ties(select_blocks(lambda: [(0, [f])], f.numel(), [reference_count(density, f.numel())])[0], True)
                           for f in flat], minus)
        return ties(flat, weights, density=density, zero_sign=zero_sign, normalize=normalize, scale=scale, state=state,
                    elect=elect, divide=divide).view(deltas[0].shape)
    # A streamed block needs one int32 scratch; the whole-tensor trim shares the workspace's.
    ws = Workspace.for_tensor(deltas[0], None) if state is None else None
    mass = trim_and_mass(deltas, weights, density, ws, state, start, elect)
    scratch = (ws.ints[: mass.numel()].view(mass.shape) if ws is not None
               else torch.empty(mass.shape, dtype=torch.int32, device=mass.device))
    # The elected sign as a word `pos`: all ones where the election says +, else 0, computed in
    # place over the mass. Adding +0.0 first turns a −0.0 sum into +0.0, so a zero sum elects +
    # (mergekit's `sum >= 0`): −(+0.0) has its sign bit set.
    if state is not None and state.minus is not None:
        minus = state.minus
    elif minus is None:  # else the whole model's election (`zero_sign: paper`)
        minus = zero_sign == "majority" and int((mass < 0).sum()) > int((mass > 0).sum())
    if minus:
        # Most of the tensor elects −: a zero sum does too, i.e. + only where the sum is > 0.
        pos = mass.neg_().add_(0.0).view(torch.int32).bitwise_right_shift_(31)
    else:
        pos = mass.add_(0.0).neg_().view(torch.int32).bitwise_right_shift_(31)
    for d in deltas:
        # Zero every entry whose sign bit differs from the elected one, with int32 ops on the float
        # bits (bool masks → float are slow on CPU): the sign bit of bits ^ pos is set exactly
        # where they agree. Zeros stay zero, so afterwards the non-zero entries are the agreeing ones.
        bits = d.view(torch.int32)
        bits.bitwise_and_(torch.bitwise_xor(bits, pos, out=scratch).bitwise_right_shift_(31))
    if normalize:
        divisor = mass  # the mass buffer, no longer needed as such
        agree = scratch.view(torch.float32)
        ones = divide == "count"
        for i, (d, w) in enumerate(zip(deltas, weights)):  # Σ w·[d ≠ 0] (or Σ [d ≠ 0])
            if i == 0:
                torch.abs(d, out=divisor).sign_()
                if w != 1.0 and not ones:
                    divisor.mul_(w)
            else:
                divisor.add_(torch.abs(d, out=agree).sign_(), alpha=1.0 if ones else w)
        # Where nothing agrees the divisor is 0 (and the sum too): make it 1, so the result is that
        # +0. With positive weights a non-zero divisor is at least the smallest weight, so raising
        # the zeros to it is one clamp (NaN stays NaN). Otherwise, bit arithmetic instead of
        # masked_fill_ (several times slower on CPU): (|bits| − 1) >> 31 is all ones exactly where
        # |divisor| = 0; masked to the bits of 1.0, added: d + 0.0 = d elsewhere.
        low = 1.0 if ones else min(weights)
        if low > 0:
            divisor.clamp_(min=low)
        else:
            one = torch.bitwise_and(divisor.view(torch.int32), 0x7FFFFFFF, out=scratch)
            divisor.add_(one.sub_(1).bitwise_right_shift_(31).bitwise_and_(0x3F800000).view(torch.float32))
    merged = deltas[0]  # the first delta's buffer accumulates the sum
    for d in deltas[1:]:
        merged.add_(d)
    if normalize:
        merged.div_(divisor)
    if scale != 1.0:
        merged.mul_(scale)
    return merged


def trim_and_mass(deltas, weights, density, ws, state, start, elect="weighted") -> torch.Tensor:
    """Trim and weight each delta in place; return the sum the election reads (a new buffer):
    of the weighted deltas, or (`unweighted`) of the trimmed ones before weighting."""
    for i, d in enumerate(deltas):
        if state is None:
            trim_(d, density, ws)
        else:
            trim_block_(d, state.trims[i], start)
    mass = _sum(deltas) if elect == "unweighted" else None
    for d, w in zip(deltas, weights):
        if w != 1.0:
            d.mul_(w)
    return mass if mass is not None else _sum(deltas)


def _sum(deltas: list[torch.Tensor]) -> torch.Tensor:
    mass = torch.add(deltas[0], deltas[1]) if len(deltas) > 1 else deltas[0].clone()
    for d in deltas[2:]:
        mass.add_(d)
    return mass


@dataclass
class TiesState:
    """What TIES needs from beyond one block: each delta's trim threshold, and the election for a
    zero sum (True: −; False: +; None: decide from the tensor itself)."""

    trims: list[Selection]
    minus: bool | None


@dataclass(frozen=True)
class GlobalTies:
    """A tensor's entry in the run state (`weightx.pipeline.global_ties`): its share of the whole-model
    trims (None with `trim_scope: tensor`) and the whole model's election for zero sums (None
    unless `zero_sign: paper`)."""

    trims: tuple[Selection, ...] | None
    minus: bool | None


def prepare_ties(blocks: Blocks, n: int, weights: list[float], density: float, zero_sign: str,
                 count: str = "exact", elect: str = "weighted", minus: bool | None = None) -> TiesState:
    """Gather `TiesState` over the blocks (2-4 passes, block-sized memory)."""
    if count == "reference":
        trims = [with_ties(sel, True) for sel in select_blocks(blocks, n, [reference_count(density, n)] * len(weights))]
    else:
        trims = select_blocks(blocks, n, [keep_count(density, n)] * len(weights))
    if zero_sign == "majority":
        def signs(start: int, ds: list[torch.Tensor]) -> tuple[int, int]:
            mass = trim_and_mass(ds, weights, density, None, TiesState(trims, False), start, elect)
            return int((mass < 0).sum()), int((mass > 0).sum())

        counts = list(each_block(blocks, signs))
        minus = sum(c[0] for c in counts) > sum(c[1] for c in counts)
    elif zero_sign == "positive":
        minus = False
    return TiesState(trims, minus)


class Ties(CombineConfig):
    op: Literal["ties"] = "ties"
    paper: ClassVar[str | None] = PAPER
    density: float
    zero_sign: Literal["positive", "majority", "paper"] = "positive"
    normalize: bool = True
    scale: float = 1.0
    trim_scope: Literal["tensor", "global"] = "tensor"
    count: Literal["exact", "reference"] = "exact"
    elect: Literal["weighted", "unweighted"] = "weighted"
    divide: Literal["weights", "count"] = "weights"

    def kept_fraction(self) -> float | None:
        return self.density  # per delta; the union over deltas is estimated by the planner

    elementwise: ClassVar[bool] = False  # trimming needs each whole tensor's threshold …

    @property
    def streams(self) -> bool:  # type: ignore[override]
        return self.trim_scope == "tensor"  # … which `prepare` gathers over blocks first

    def prepass(self) -> Prepass | None:
        return "global_statistics" if self.trim_scope == "global" or self.zero_sign == "paper" else None

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        return check_density(v)

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        run: GlobalTies | None = ctx.run  # type: ignore[assignment]
        state: TiesState | None = ctx.state  # type: ignore[assignment]
        if run is not None and run.trims is not None:  # whole-model trims: the tensor comes whole
            state = TiesState(list(run.trims), run.minus)
        elif run is not None and run.minus is not None:
            state = TiesState(state.trims, run.minus) if state is not None else None
        return ties(
            deltas, weights, density=self.density, zero_sign=self.zero_sign, normalize=self.normalize, scale=self.scale,
            state=state, start=ctx.offset if ctx.state is not None else 0, count=self.count, elect=self.elect,
            divide=self.divide, minus=run.minus if run is not None else None,
        )

    def prepare(self, blocks: Blocks, weights: list[float], ctx: TensorContext) -> TiesState:
        return prepare_ties(blocks, ctx.numel, weights, self.density, self.zero_sign, self.count, self.elect)

    def describe(self) -> str:
        opts = [f"density={self.density:g}"]
        if self.zero_sign != "positive":
            opts.append(f"zero_sign={self.zero_sign}")
        if not self.normalize:
            opts.append("normalize=false")
        if self.scale != 1.0:
            opts.append(f"scale={self.scale:g}")
        for key, default in (("trim_scope", "tensor"), ("count", "exact"), ("elect", "weighted"), ("divide", "weights")):
            if getattr(self, key) != default:
                opts.append(f"{key}={getattr(self, key)}")
        return f"TIES({', '.join(opts)})"
