"""Spherical linear interpolation between the base and one fine-tune, per tensor (mergekit's `slerp`).

Shoemake, "Animating rotation with quaternion curves" (1985); mergekit's `slerp`. With v0 = θ_base
and v1 = θ_base + δ (the one delta, edited and weighted) flattened, cos Ω = ⟨v0/‖v0‖, v1/‖v1‖⟩
(norms under 1e-8 count as 1), clamped to [−1, 1]: θ = sin((1−t)Ω)/sin Ω·v0 + sin(tΩ)/sin Ω·v1,
or the linear (1−t)·v0 + t·v1 when |cos Ω| > 0.9995 (mergekit's threshold). t = 0 gives the base,
t = 1 the fine-tune. The coefficients are computed in float64 from float64 norms and dot (mergekit:
float32), then applied in float32: results agree with mergekit to float32 rounding.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch

from weightx.combine.base import CombineConfig
from weightx.edits.base import TensorContext

PAPER = "https://doi.org/10.1145/325165.325242"  # Shoemake 1985
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """(a, b) with slerp(t, v0, v1) = a·v0 + b·v1, from float64 statistics."""
    x, y = v0.reshape(-1).to(torch.float64), v1.reshape(-1).to(torch.float64)
    n0, n1 = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y))
    n0, n1 = (n0 if n0 > EPS else 1.0), (n1 if n1 > EPS else 1.0)
    dot = max(-1.0, min(1.0, float(torch.dot(x, y)) / (n0 * n1)))
    if abs(dot) > DOT_THRESHOLD or x.numel() == 0:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


class Slerp(CombineConfig):
    op: Literal["slerp"] = "slerp"
    paper: ClassVar[str | None] = PAPER
    t: float

    elementwise: ClassVar[bool] = False  # norms and the angle of whole tensors
    needs_base: ClassVar[bool] = True

    def check(self, weights: list[float]) -> str | None:
        if len(weights) != 1:
            return f"slerp interpolates between the base and exactly one delta, got {len(weights)} deltas; use linear, nuslerp or ties for more"
        return None

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        base = ctx.base.reshape(deltas[0].shape)
        d = deltas[0] if weights[0] == 1.0 else deltas[0].mul_(weights[0])
        v1 = torch.add(base, d)
        a, b = slerp_coefficients(self.t, base, v1)
        # θ − θ_base = (a + b − 1)·θ_base + b·δ; at t = 0 and t = 1 exactly 0 and δ.
        out = d.mul_(b) if b != 1.0 else d
        if a + b - 1.0 != 0.0:
            out.add_(torch.mul(base, a + b - 1.0))
        return out
