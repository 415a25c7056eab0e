"""SCE: select by variance, calculate weights, erase minority signs (mergekit's `sce`).

Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990), as mergekit's `sce`.
Per tensor, for N deltas δ_i (the recipe's weights are not used, as in mergekit):
1. select (when `select_topk` < 1): keep the k = ⌊select_topk·m⌋ entries of largest variance across
   the deltas (population variance; m = entries with non-zero variance; k = 0 keeps nothing), ties
   by lowest flat index (mergekit: torch.topk's order), zero the rest in every delta;
2. calculate: w_i = mean(δ_i²) / Σ_j mean(δ_j²) (1/N each when that sum is under 1e-6);
3. erase: keep an entry of δ_i only where its sign equals the sign of Σ_j δ_j (+ where the sum is ≥ 0;
   zeros never agree);
4. θ = θ_base + Σ_i w_i·m_i·δ_i / max(Σ_i w_i·m_i, 1e-6).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar, Literal

import torch
from pydantic import field_validator
from pydantic_core import PydanticCustomError

from weightx.combine.base import CombineConfig
from weightx.edits.base import TensorContext
from weightx.kernels.topk import topk_mask

PAPER = "https://arxiv.org/abs/2408.07990"


def sce(deltas: list[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    tvs = torch.stack([d.reshape(-1) for d in deltas])
    if select_topk < 1:
        var = tvs.to(torch.float64).var(dim=0, unbiased=False).to(torch.float32)
        k = math.floor(Fraction(str(select_topk)) * int(torch.count_nonzero(var))) if select_topk > 0 else 0
        tvs.mul_(topk_mask(var, k))
    sq = [float(x.to(torch.float64).square().mean()) for x in tvs]
    total = sum(sq)
    weights = [1.0 / len(sq)] * len(sq) if abs(total) < 1e-6 else [s / total for s in sq]
    majority = torch.where(tvs.sum(0) >= 0, 1.0, -1.0)
    agree = (tvs.sign() == majority).to(torch.float32)
    w = torch.tensor(weights, dtype=torch.float32).unsqueeze(1) * agree
    merged = (tvs * w).sum(0) / w.sum(0).clamp(min=1e-6)
    return merged.view(deltas[0].shape)


class Sce(CombineConfig):
    op: Literal["sce"] = "sce"
    paper: ClassVar[str | None] = PAPER
    select_topk: float = 1.0

    elementwise: ClassVar[bool] = False  # variance ranks and mean squares of whole tensors

    @field_validator("select_topk")
    @classmethod
    def _range(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise PydanticCustomError("select_topk_range", "select_topk must satisfy 0 <= select_topk <= 1 (the fraction of entries of largest variance kept), got {value}", {"value": v})
        return v

    def check(self, weights: list[float]) -> str | None:
        if len(weights) < 2:
            return f"sce weighs and elects among several deltas, got {len(weights)}; use sum for one"
        return None

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        return sce(deltas, self.select_topk)
