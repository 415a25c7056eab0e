"""TIES merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (arXiv 2306.01708).
Per tensor, for deltas τ_t with weights w_t:
1. trim: keep the top-`density` fraction of |τ_t| (exact count, ties by lowest flat index; see
   `weightx.topk`). Per tensor, as mergekit and MergeLM's successor do; the paper trims globally.
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
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import field_validator

from weightx.combine.base import CombineConfig
from weightx.edits.base import TensorContext
from weightx.edits.magnitude import check_density
from weightx.topk import Workspace, trim_

PAPER = "https://arxiv.org/abs/2306.01708"


def ties(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    density: float,
    zero_sign: Literal["positive", "majority"] = "positive",
    normalize: bool = True,
    scale: float = 1.0,
) -> torch.Tensor:
    """TIES over same-shaped float32 deltas; the deltas are modified in place.

    Whole-tensor temporaries: one float32 (the mass, then the divisor), one int32 and one bool."""
    deltas = [d.contiguous() for d in deltas]
    ws = Workspace.for_tensor(deltas[0], None)
    for d, w in zip(deltas, weights):
        trim_(d, density, ws)
        if w != 1.0:
            d.mul_(w)
    mass = deltas[0].clone()
    for d in deltas[1:]:
        mass.add_(d)
    # The elected sign as a sign bit, computed in place over the mass: `neg` is all ones (−1) where
    # the election says −, else 0. Adding +0.0 turns a −0.0 sum into +0.0, so a zero sum elects +
    # (mergekit's `sum >= 0`).
    if zero_sign == "majority" and int((mass < 0).sum()) > int((mass > 0).sum()):
        # Most of the tensor elects −: a zero sum does too, i.e. − wherever −sum ≥ 0.
        neg = mass.neg_().add_(0.0).view(torch.int32).bitwise_right_shift_(31).bitwise_not_()
    else:
        neg = mass.add_(0.0).view(torch.int32).bitwise_right_shift_(31)
    scratch = ws.ints[: mass.numel()].view(mass.shape)
    for d in deltas:
        # Zero every entry whose sign bit differs from the elected one, with int32 ops on the float
        # bits (bool masks → float are slow on CPU). Zeros stay zero, so afterwards the non-zero
        # entries are exactly the agreeing ones.
        bits = d.view(torch.int32)
        torch.bitwise_xor(bits, neg, out=scratch)
        bits.bitwise_and_(scratch.bitwise_right_shift_(31).bitwise_not_())
    if normalize:
        divisor = mass.zero_()  # the mass buffer, no longer needed as such
        agree = scratch.view(torch.float32)
        for d, w in zip(deltas, weights):
            divisor.add_(torch.abs(d, out=agree).sign_(), alpha=w)  # w·[d ≠ 0]
        zero = torch.eq(divisor, 0, out=ws.flags[: divisor.numel()].view(divisor.shape))
        divisor.masked_fill_(zero, 1.0)
    merged = deltas[0]  # the first delta's buffer accumulates the sum
    for d in deltas[1:]:
        merged.add_(d)
    if normalize:
        merged.div_(divisor)
    if scale != 1.0:
        merged.mul_(scale)
    return merged


class Ties(CombineConfig):
    op: Literal["ties"] = "ties"
    density: float
    zero_sign: Literal["positive", "majority"] = "positive"
    normalize: bool = True
    scale: float = 1.0

    elementwise: ClassVar[bool] = False  # trimming needs each whole tensor

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        return check_density(v)

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        return ties(
            deltas, weights, density=self.density, zero_sign=self.zero_sign, normalize=self.normalize, scale=self.scale
        )

    def describe(self) -> str:
        opts = [f"density={self.density:g}"]
        if self.zero_sign != "positive":
            opts.append(f"zero_sign={self.zero_sign}")
        if not self.normalize:
            opts.append("normalize=false")
        if self.scale != 1.0:
            opts.append(f"scale={self.scale:g}")
        return f"TIES({', '.join(opts)})"
