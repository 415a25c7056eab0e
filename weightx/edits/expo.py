"""ExPO: model extrapolation, δ ← (1 + α)·δ.

Zheng et al., "Model Extrapolation Expedites Alignment" (arXiv 2404.16792).
With base = SFT and the aligned (DPO/RLHF) model as the delta, the output is
θ_dpo + α(θ_dpo − θ_sft). The reference edits every parameter, so the default include is "*".
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from weightx.edits.base import EditConfig, TensorContext

PAPER = "https://arxiv.org/abs/2404.16792"


class Expo(EditConfig):
    op: Literal["expo"] = "expo"
    paper: ClassVar[str | None] = PAPER
    alpha: float

    def apply(self, delta: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return delta.mul_(1.0 + self.alpha)

    def linear_factor(self) -> float:
        return 1.0 + self.alpha

    def describe(self) -> str:
        return f"ExPO extrapolation α={self.alpha:g}"
