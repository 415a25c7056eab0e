"""TIES merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (arXiv 2306.01708).
Per tensor, for deltas τ_t with weights w_t:
1. trim: keep the top-`density` fraction of |τ_t| (exact count, ties by lowest flat index; see
   `weightx.kernels.topk`). Per tensor, as mergekit and MergeLM's successor do; the paper trims globally.
2. weight: τ̂_t = w_t·τ_t. Weights are applied before the election, as in mergekit, so a weight
   scales a delta's say in the sign as well as its contribution.
3. elect: γ = sign(Σ_t τ̂_t) ("mass"). Where the sum is exactly 0, `zero_sign: positive` (the
   default) elects +1, as mergekit's `(sum >= 0)*2 - 1`; `zero_sign: majority` elects the sign held
   by most entries of this tensor, as the paper's code does (+1 if that is a tie too).
4. disjoint merge: over the entries whose sign agrees with γ (zeros never agree),
   `normalize: true` (default) gives Σ τ̂_t / Σ w_t, the weighted mean, which is the paper's
   disjoint mean for unit weights and mergekit's `ties`; `normalize: false` gives the plain sum
   Σ τ̂_t (mergekit's `dare_ties` default). Entries where nothing agrees are 0.
5. scale: multiply by `scale` (the paper's λ, mergekit's `lambda`; default 1).
With `dare` edits on the deltas first this is DARE-TIES (MergeLM: DARE, then TIES).

Streaming: the only tensor-wide facts are each delta's trim threshold (and, for `majority`, the
sign counts); `prepare` gathers them in pre-passes over blocks (`weightx.kernels.topk.select_blocks`), after
which every step is elementwise and the engine computes the tensor in blocks, bit for bit equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import field_validator

from weightx.combine.base import CombineConfig
from weightx.edits.base import TensorContext
from weightx.edits.magnitude import check_density
from weightx.kernels.topk import Blocks, Selection, Workspace, each_block, keep_count, select_blocks, trim_, trim_block_

PAPER = "https://arxiv.org/abs/2306.01708"


def ties(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    density: float,
    zero_sign: Literal["positive", "majority"] = "positive",
    normalize: bool = True,
    scale: float = 1.0,
    state: "TiesState | None" = None,
    start: int = 0,
) -> torch.Tensor:
    """TIES over same-shaped float32 deltas; the deltas are modified in place.

    With `state` (from `prepare_ties`) the deltas are the block at flat index `start` of each
    whole tensor, and the result is that block of the whole-tensor result, bit for bit.
    Temporaries (tensor- or block-sized): one float32 (the mass, then the divisor) and one int32."""
    deltas = [d.contiguous() for d in deltas]
    # A streamed block needs one int32 scratch; the whole-tensor trim shares the workspace's.
    ws = Workspace.for_tensor(deltas[0], None) if state is None else None
    mass = _trim_and_mass(deltas, weights, density, ws, state, start)
    scratch = (ws.ints[: mass.numel()].view(mass.shape) if ws is not None
               else torch.empty(mass.shape, dtype=torch.int32, device=mass.device))
    # The elected sign as a word `pos`: all ones where the election says +, else 0, computed in
    # place over the mass. Adding +0.0 first turns a −0.0 sum into +0.0, so a zero sum elects +
    # (mergekit's `sum >= 0`): −(+0.0) has its sign bit set.
    if state is not None:
        minus = state.minus
    else:
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
        for i, (d, w) in enumerate(zip(deltas, weights)):  # Σ w·[d ≠ 0]
            if i == 0:
                torch.abs(d, out=divisor).sign_()
                if w != 1.0:
                    divisor.mul_(w)
            else:
                divisor.add_(torch.abs(d, out=agree).sign_(), alpha=w)
        # Where nothing agrees the divisor is 0 (and the sum too): make it 1, so the result is that
        # +0. With positive weights a non-zero divisor is at least the smallest weight, so raising
        # the zeros to it is one clamp (NaN stays NaN). Otherwise, bit arithmetic instead of
        # masked_fill_ (several times slower on CPU): (|bits| − 1) >> 31 is all ones exactly where
        # |divisor| = 0; masked to the bits of 1.0, added: d + 0.0 = d elsewhere.
        if min(weights) > 0:
            divisor.clamp_(min=min(weights))
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


def _trim_and_mass(deltas, weights, density, ws, state, start) -> torch.Tensor:
    """Trim and weight each delta in place; return their sum (a new buffer)."""
    for i, (d, w) in enumerate(zip(deltas, weights)):
        if state is None:
            trim_(d, density, ws)
        else:
            trim_block_(d, state.trims[i], start)
        if w != 1.0:
            d.mul_(w)
    mass = torch.add(deltas[0], deltas[1]) if len(deltas) > 1 else deltas[0].clone()
    for d in deltas[2:]:
        mass.add_(d)
    return mass


@dataclass
class TiesState:
    """What a streamed TIES needs from the whole tensor: each delta's trim threshold, and the
    election for a zero sum (− only with `zero_sign: majority` when most of the tensor elects −)."""

    trims: list[Selection]
    minus: bool


def prepare_ties(blocks: Blocks, n: int, weights: list[float], density: float, zero_sign: str) -> TiesState:
    """Gather `TiesState` over the blocks (2-4 passes, block-sized memory)."""
    trims = select_blocks(blocks, n, [keep_count(density, n)] * len(weights))
    minus = False
    if zero_sign == "majority":
        def signs(start: int, ds: list[torch.Tensor]) -> tuple[int, int]:
            mass = _trim_and_mass(ds, weights, density, None, TiesState(trims, False), start)
            return int((mass < 0).sum()), int((mass > 0).sum())

        counts = list(each_block(blocks, signs))
        minus = sum(c[0] for c in counts) > sum(c[1] for c in counts)
    return TiesState(trims, minus)


class Ties(CombineConfig):
    op: Literal["ties"] = "ties"
    paper: ClassVar[str | None] = PAPER
    density: float
    zero_sign: Literal["positive", "majority"] = "positive"
    normalize: bool = True
    scale: float = 1.0

    elementwise: ClassVar[bool] = False  # trimming needs each whole tensor's threshold …
    streams: ClassVar[bool] = True  # … which `prepare` gathers over blocks first

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        return check_density(v)

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        return ties(
            deltas, weights, density=self.density, zero_sign=self.zero_sign, normalize=self.normalize, scale=self.scale,
            state=ctx.state, start=ctx.offset,
        )

    def prepare(self, blocks: Blocks, weights: list[float], ctx: TensorContext) -> TiesState:
        return prepare_ties(blocks, ctx.numel, weights, self.density, self.zero_sign)

    def describe(self) -> str:
        opts = [f"density={self.density:g}"]
        if self.zero_sign != "positive":
            opts.append(f"zero_sign={self.zero_sign}")
        if not self.normalize:
            opts.append("normalize=false")
        if self.scale != 1.0:
            opts.append(f"scale={self.scale:g}")
        return f"TIES({', '.join(opts)})"
