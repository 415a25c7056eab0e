"""Scale: δ ← factor·δ (task-vector scaling, λ in task arithmetic)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from weightx.edits.base import EditConfig, TensorContext

PAPER = "https://arxiv.org/abs/2212.04089"


class Scale(EditConfig):
    op: Literal["scale"] = "scale"
    paper: ClassVar[str | None] = PAPER
    factor: float

    def apply(self, delta: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return delta.mul_(self.factor)

    def linear_factor(self) -> float:
        return self.factor

    def describe(self) -> str:
        return f"scale ×{self.factor:g}"
