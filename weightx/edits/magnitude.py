"""Magnitude pruning: keep exactly the top-`density` fraction of |δ| per tensor, zero the rest.

The trim step of TIES (Yadav et al., arXiv 2306.01708) as a standalone edit, and, with
`rescale: inverse_keep`, MergeLM's magnitude ablation of DARE ("MP", mask_strategy=magnitude:
drop the p = 1 − density smallest and rescale survivors by 1/(1 − p)). Count and tie-breaking are
those of `weightx.kernels.topk`: ⌊density·n⌋ (at least 1) entries, ties at the threshold broken by lowest
flat index. MergeLM instead drops every entry ≤ the threshold, so with ties it drops more; and it
crashes when ⌊p·n⌋ = 0.

`rescale: l1` scales the kept entries so the tensor's L1 norm is unchanged (mergekit's
`magnitude` sparsification with `rescale: true`).

`count: reference` reproduces MergeLM's count: it drops the int(n·(1 − density)) smallest |δ| (float
arithmetic, as its code) and every entry tied with the last of them, keeping what lies strictly
above; where that count is 0 (MergeLM crashes) everything is kept.

The engine streams it: `prepare` finds the threshold (and the L1 factor) over blocks, then each
block is trimmed on its own (`weightx.kernels.topk.trim_block_`), bit for bit as on the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import field_validator
from pydantic_core import PydanticCustomError

from weightx.edits.base import EditConfig, TensorContext
from weightx.edits.dare import l1_chunks, l1_factor, l1_norm
from weightx.kernels.topk import (Blocks, Selection, each_block, keep_count, mergelm_count, select_blocks, trim_, trim_block_,
                                  with_ties)

PAPER = "https://arxiv.org/abs/2306.01708"


def magnitude_(
    delta: torch.Tensor,
    density: float,
    rescale: Literal["none", "inverse_keep", "l1"] = "none",
    state: "MagnitudeState | None" = None,
    start: int = 0,
    count: Literal["exact", "reference"] = "exact",
) -> torch.Tensor:
    """Magnitude pruning in place: of the whole tensor, or with `state` (from `prepare_magnitude`)
    of its block at flat index `start`, bit for bit that block of the whole-tensor result."""
    if state is None and count == "reference":  # the whole tensor as one block
        flat = delta.contiguous().view(-1)
        state = prepare_magnitude(lambda: [(0, [flat])], flat.numel(), density, rescale, count)
        return magnitude_(flat, density, rescale, state, 0).view(delta.shape)
    if state is not None:
        delta = trim_block_(delta.contiguous(), state.sel, start)
        scale = state.l1_scale
    else:
        sums_in = l1_chunks(delta) if rescale == "l1" else []
        delta = trim_(delta.contiguous(), density)
        scale = l1_factor(sum(sums_in), l1_norm(delta)) if rescale == "l1" else None
    if rescale == "inverse_keep" and density < 1.0:
        delta.mul_(1.0 / density)
    elif rescale == "l1" and scale is not None:
        delta.mul_(scale)
    return delta


@dataclass
class MagnitudeState:
    sel: Selection
    l1_scale: float | None = None


def prepare_magnitude(blocks: Blocks, n: int, density: float, rescale: str, count: str = "exact") -> MagnitudeState:
    """The tensor-wide threshold (and `l1` factor, from chunk sums folded in block order)."""
    if count == "reference":
        state = MagnitudeState(with_ties(select_blocks(blocks, n, [mergelm_count(density, n)])[0], keep=False))
    else:
        state = MagnitudeState(select_blocks(blocks, n, [keep_count(density, n)])[0])
    if rescale == "l1":
        def chunk_sums(start: int, ds: list[torch.Tensor]) -> tuple[list[float], list[float]]:
            before = l1_chunks(ds[0])
            return before, l1_chunks(trim_block_(ds[0], state.sel, start))

        sums_in: list[float] = []
        sums_out: list[float] = []
        for before, after in each_block(blocks, chunk_sums):  # folded in block order
            sums_in += before
            sums_out += after
        state.l1_scale = l1_factor(sum(sums_in), sum(sums_out))
    return state


def check_density(v: float) -> float:
    if not 0.0 < v <= 1.0:
        raise PydanticCustomError(
            "density_range",
            "density must satisfy 0 < density <= 1 (the fraction of entries kept per tensor; "
            "e.g. 0.2 keeps the largest 20%), got {value}",
            {"value": v},
        )
    return v


class Magnitude(EditConfig):
    op: Literal["magnitude"] = "magnitude"
    paper: ClassVar[str | None] = PAPER
    density: float
    rescale: Literal["none", "inverse_keep", "l1"] = "none"
    count: Literal["exact", "reference"] = "exact"  # reference: MergeLM's (see the module doc)

    def kept_fraction(self) -> float | None:
        return self.density

    elementwise = False  # the threshold is a statistic of the whole tensor …
    streams = True  # … which `prepare` gathers over blocks first

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        return check_density(v)

    def apply(self, delta: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return magnitude_(delta, self.density, self.rescale, ctx.state, ctx.offset, self.count)

    def prepare(self, blocks: Blocks, ctx: TensorContext) -> MagnitudeState:
        return prepare_magnitude(blocks, ctx.numel, self.density, self.rescale, self.count)

    def describe(self) -> str:
        extra = f" rescale={self.rescale}" if self.rescale != "none" else ""
        extra += " count=reference (MergeLM)" if self.count == "reference" else ""
        return f"magnitude top {self.density:g}{extra}"
