"""Model Stock: interpolate toward the fine-tunes' average by a ratio set by their angle.

Jang et al., "Model Stock: All we need is just a few fine-tuned models" (arXiv 2403.19522), as
mergekit's `model_stock`. For N ≥ 2 deltas δ_i (edited and weighted), cos θ = the mean over pairs
of ⟨δ_i, δ_j⟩ / max(‖δ_i‖·‖δ_j‖, 1e-6), each clamped to [−1, 1]; t = N·cos θ / (1 + (N−1)·cos θ)
(t = 0 where |1 + (N−1)·cos θ| < 1e-6, as mergekit: keep the base rather than amplify opposing
updates); θ = θ_base + t·mean(δ_i), which is mergekit's t·mean(θ_i) + (1−t)·θ_base. Per whole
tensor, or per row (last axis) with `filter_wise: true`. Statistics in float64 (mergekit: float32).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from weightx.combine.base import CombineConfig
from weightx.combine.sum import weighted_sum
from weightx.edits.base import TensorContext

PAPER = "https://arxiv.org/abs/2403.19522"


def stock_ratio(deltas: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """t per row (filter_wise: shape (rows, 1)) or for the tensor (shape (1, 1)), float64."""
    c = deltas[0].shape[-1] if filter_wise and deltas[0].dim() >= 1 else deltas[0].numel()
    xs = [d.reshape(-1, max(c, 1)).to(torch.float64) for d in deltas]
    norms = [torch.linalg.vector_norm(x, dim=-1) for x in xs]
    cos = []
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            cos.append(((xs[i] * xs[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    mean_cos = torch.stack(cos).mean(0)
    n = len(xs)
    den = 1 + (n - 1) * mean_cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(mean_cos), n * mean_cos / torch.where(singular, 1.0, den))
    return t.unsqueeze(-1)


class ModelStock(CombineConfig):
    op: Literal["model_stock"] = "model_stock"
    paper: ClassVar[str | None] = PAPER
    filter_wise: bool = False

    elementwise: ClassVar[bool] = False  # cosines of whole tensors (or rows)

    def check(self, weights: list[float]) -> str | None:
        if len(weights) < 2:
            return f"model_stock needs at least 2 deltas (it averages fine-tunes by their angle), got {len(weights)}"
        return None

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        shape = deltas[0].shape
        scaled = [d if w == 1.0 else d.mul_(w) for d, w in zip(deltas, weights)]
        t = stock_ratio(scaled, self.filter_wise)
        out = weighted_sum(scaled, [1.0] * len(scaled)).div_(len(scaled))
        rows = out.reshape(t.shape[0], -1)
        rows.mul_(t.to(torch.float32))
        return rows.reshape(shape)
