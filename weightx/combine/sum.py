"""Task arithmetic: Σ_i w_i·δ_i (Ilharco et al., arXiv 2212.04089). ExPO is one delta with sum."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from weightx.combine.base import CombineConfig
from weightx.edits.base import TensorContext

PAPER = "https://arxiv.org/abs/2212.04089"


def weighted_sum(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    # Separate mul and add kernels (no fused alpha=) so every element rounds the same way on any
    # block size, thread count or device.
    out = deltas[0] if weights[0] == 1.0 else deltas[0].mul_(weights[0])
    for d, w in zip(deltas[1:], weights[1:]):
        out = out.add_(d if w == 1.0 else d.mul_(w))
    return out


class Sum(CombineConfig):
    op: Literal["sum"] = "sum"
    paper: ClassVar[str | None] = PAPER

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        return weighted_sum(deltas, weights)

    def linear(self, weights: list[float]) -> tuple[list[float], float | None]:
        return weights, None
