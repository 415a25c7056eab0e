"""Magnitude pruning: keep exactly the top-`density` fraction of |δ| per tensor, zero the rest.

The trim step of TIES (Yadav et al., arXiv 2306.01708) as a standalone edit, and, with
`rescale: inverse_keep`, MergeLM's magnitude ablation of DARE ("MP", mask_strategy=magnitude:
drop the p = 1 − density smallest and rescale survivors by 1/(1 − p)). Count and tie-breaking are
those of `weightx.topk`: ⌊density·n⌋ (at least 1) entries, ties at the threshold broken by lowest
flat index. MergeLM instead drops every entry ≤ the threshold, so with ties it drops more; and it
crashes when ⌊p·n⌋ = 0.

`rescale: l1` scales the kept entries so the tensor's L1 norm is unchanged (mergekit's
`magnitude` sparsification with `rescale: true`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import field_validator
from pydantic_core import PydanticCustomError

from weightx.edits.base import EditConfig, TensorContext
from weightx.edits.dare import L1_EPS, l1_norm
from weightx.topk import trim_

PAPER = "https://arxiv.org/abs/2306.01708"


def magnitude_(delta: torch.Tensor, density: float, rescale: Literal["none", "inverse_keep", "l1"] = "none") -> torch.Tensor:
    """Magnitude pruning in place (whole tensor)."""
    norm_in = l1_norm(delta) if rescale == "l1" else 0.0
    delta = trim_(delta.contiguous(), density)
    if rescale == "inverse_keep" and density < 1.0:
        delta.mul_(1.0 / density)
    elif rescale == "l1":
        norm_out = l1_norm(delta)
        if norm_in >= L1_EPS and norm_out >= L1_EPS:
            delta.mul_(norm_in / norm_out)
    return delta


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
    density: float
    rescale: Literal["none", "inverse_keep", "l1"] = "none"

    elementwise = False  # the threshold is a statistic of the whole tensor

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        return check_density(v)

    def apply(self, delta: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return magnitude_(delta, self.density, self.rescale)

    def describe(self) -> str:
        extra = f" rescale={self.rescale}" if self.rescale != "none" else ""
        return f"magnitude top {self.density:g}{extra}"
