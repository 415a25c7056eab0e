"""NuSLERP: spherical interpolation of two task vectors (or of the base and one fine-tune), mergekit's `nuslerp`.

With two deltas δ_0, δ_1: θ = θ_base + slerp(t, δ_0, δ_1), t = `t` or, by default, w_1/(w_0 + w_1)
from the deltas' weights (0.5 when that sum is under 1e-6), as mergekit's `nuslerp` with a base.
With one delta: θ = slerp(t, θ_base, θ_base + δ) (mergekit's `nuslerp` without a base, of two
models). slerp(t, a, b) = (sin((1−t)Ω)·a + sin(tΩ)·b)/sin Ω with cos Ω = ⟨a/‖a‖, b/‖b‖⟩ (norms
clamped to ≥ 1e-7), the linear (1−t)·a + t·b where 1 − cos²Ω ≤ 1e-16; over the whole tensor
(`flatten: true`, the default), or per row of the last axis, or per column with `row_wise: true`
(mergekit's `nuslerp_row_wise`: along axis 0). Coefficients in float64, applied in float32.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from weightx.combine.base import CombineConfig
from weightx.edits.base import TensorContext

EPS = 1e-8


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool = True, row_wise: bool = False) -> torch.Tensor:
    """float32 slerp of v0 toward v1 (new tensor, v0's shape); statistics in float64."""
    shape = v0.shape
    if flatten or v0.dim() < 2:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    x, y = a.to(torch.float64), b.to(torch.float64)
    nx = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)
    ny = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((x / nx) * (y / ny)).sum(-1, keepdim=True).clamp(-1, 1)
    del x, y
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    s = torch.sin(theta)
    ca = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / torch.where(colinear, 1.0, s)).to(torch.float32)
    cb = torch.where(colinear, t, torch.sin(t * theta) / torch.where(colinear, 1.0, s)).to(torch.float32)
    out = a * ca + b * cb
    if not flatten and row_wise and v0.dim() >= 2:
        out = out.transpose(0, -1)
    return out.reshape(shape)


class Nuslerp(CombineConfig):
    op: Literal["nuslerp"] = "nuslerp"
    t: float | None = None  # None: w_1/(w_0 + w_1) from the two deltas' weights
    flatten: bool = True
    row_wise: bool = False

    elementwise: ClassVar[bool] = False  # norms and angles of whole tensors (or rows)
    needs_base: ClassVar[bool] = True  # one delta: interpolates from the base itself

    def check(self, weights: list[float]) -> str | None:
        if len(weights) not in (1, 2):
            return f"nuslerp interpolates two task vectors (or the base and one fine-tune), got {len(weights)} deltas"
        if len(weights) == 1 and self.t is None:
            return "nuslerp with one delta interpolates from the base to it: set t (0 = the base, 1 = the fine-tune)"
        return None

    def ratio(self, weights: list[float]) -> float:
        if self.t is not None:
            return self.t
        total = sum(weights)
        return 0.5 if abs(total) < 1e-6 else weights[1] / total

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        t = self.ratio(weights)
        if len(deltas) == 2:
            return nuslerp(t, deltas[0], deltas[1], self.flatten, self.row_wise)
        base = ctx.base.reshape(deltas[0].shape)
        v1 = deltas[0].add_(base)
        return nuslerp(t, base, v1, self.flatten, self.row_wise).sub_(base)
