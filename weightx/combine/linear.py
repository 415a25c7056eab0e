"""Linear merging (model soups): the weighted average of the models, as mergekit's `linear`.

Wortsman et al., "Model soups" (arXiv 2203.05482). θ = (w_b·θ_base + Σ_i w_i·θ_i) / W with
W = w_b + Σ_i w_i when `normalize: true` (the default, as mergekit), W = 1 otherwise. In delta form
(θ_i = θ_base + δ_i): normalised, θ = θ_base + Σ_i w_i·δ_i / W, the base's own weight `base_weight`
(default 0: the base is only the reference the deltas are taken against) only enlarging W; not
normalised, θ = W'·θ_base + Σ_i w_i·δ_i with W' = w_b + Σ_i w_i, so the base itself is needed.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from weightx.combine.base import CombineConfig
from weightx.combine.sum import weighted_sum
from weightx.edits.base import TensorContext
from weightx.errors import UsageError

PAPER = "https://arxiv.org/abs/2203.05482"


class Linear(CombineConfig):
    op: Literal["linear"] = "linear"
    paper: ClassVar[str | None] = PAPER
    normalize: bool = True
    base_weight: float = 0.0

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        return not self.normalize  # θ_base·(W' − 1) joins the sum

    def total(self, weights: list[float]) -> float:
        return self.base_weight + sum(weights)

    def check(self, weights: list[float]) -> str | None:
        if self.normalize and self.total(weights) == 0:
            return "linear with normalize: true divides by the sum of the weights (and base_weight), which is 0; change a weight or set normalize: false"
        return None

    def linear(self, weights: list[float]) -> tuple[list[float], float | None] | None:
        if self.check(weights):
            return None
        if self.normalize:
            return weights, self.total(weights)
        return (weights, None) if self.total(weights) == 1.0 else None  # else the base joins the sum

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        problem = self.check(weights)
        if problem:
            raise UsageError(problem)
        out = weighted_sum(deltas, weights)
        if self.normalize:
            return out.div_(self.total(weights))
        extra = self.total(weights) - 1.0  # θ = θ_base + (W' − 1)·θ_base + Σ w·δ
        if extra != 0.0:
            out.add_(torch.mul(ctx.base.reshape(out.shape), extra))
        return out
