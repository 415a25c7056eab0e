"""Mean of the weighted deltas: (1/n)·Σ_i w_i·δ_i (model soup / average merging around a base)."""

from __future__ import annotations

from typing import Literal

import torch

from weightx.combine.base import CombineConfig
from weightx.combine.sum import weighted_sum
from weightx.edits.base import TensorContext


class Mean(CombineConfig):
    op: Literal["mean"] = "mean"

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        out = weighted_sum(deltas, weights)
        return out if len(deltas) == 1 else out.div_(len(deltas))

    def linear(self, weights: list[float]) -> tuple[list[float], float | None]:
        return weights, (len(weights) if len(weights) > 1 else None)
