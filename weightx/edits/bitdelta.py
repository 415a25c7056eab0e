"""BitDelta: a fine-tune's delta as one sign bit per weight plus one float scale per matrix.

Liu et al., "BitDelta: Your Fine-Tune May Only Be Worth One Bit" (NeurIPS 2024, arXiv 2402.10193):
δ̂ = α·sign(δ), α = mean|δ| (the L2-optimal scale for a fixed sign pattern:
‖δ − α·S‖² = Σ(|δ_ij| − α)², minimised at the mean). `distill:` then trains the scales only, on
the logit MSE against the fine-tuned model (`weightx.pipeline.distill`).

Sign of zero: **sign(0) = +1**, as the reference code does (`mask[diff < 0] = 0`); the paper's
text says −1. bf16 deltas hold many exact zeros, so the choice shows in the output.

Extensions (Unified View of delta editing, arXiv 2410.13841, and BitDelta's own ablation):
- `scale_multiplier` c: the stored scales are c·α (c = 1 is BitDelta).
- `bits: b > 1`, residual binarisation: R₀ = δ, α_j = mean|R_{j−1}|, S_j = sign(R_{j−1}),
  R_j = R_{j−1} − α_j·S_j, δ̂ = c·Σ_j α_j·S_j. ‖δ − δ̂‖ never increases with b (c = 1), and b = 1
  is plain BitDelta.
- `group: row`: one scale per output row (per vector along the last dimension) instead of one per
  matrix; the residual chain is then per row.

Storage (`output.format: delta`): `W.packed` uint8 [b, *shape[:-1], ⌈in/8⌉] sign planes (bit = 1
means +), LSB first along the last dimension; `W.scale` float32 [b] (group tensor) or
[b, *shape[:-1]] (group row). The dense output is base + decode(encode(δ)), literally, so it equals
a reconstruction from the artifact bit for bit.

By default every layer weight is compressed (`weightx.edits.base.is_layer_weight`: 2-D matrices of
linear and Conv1D layers and 3-D stacked experts; the reference replaces the `*proj*` linears of
attention and MLP blocks); embeddings, lm_head, norms, biases and routers keep their fine-tuned
values. `include` / `exclude` override this; `weightx plan` prints the share of matrix parameters
compressed.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from weightx.edits.base import CodecEdit, Prepass, TensorContext
from weightx.formats.bitdelta import binarize, debinarize, decode_parts, part_specs

__all__ = ["BitDelta", "Distill", "binarize", "debinarize", "decode_parts"]

PAPER = "https://arxiv.org/abs/2402.10193"


class Distill(BaseModel):
    """Scale distillation (BitDelta §3.2): only the scales train, on logit MSE to the fine-tuned model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str  # a UTF-8 text file: calibration text (relative paths: to the recipe, then the cwd)
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(128, ge=2)


class BitDelta(CodecEdit):
    op: Literal["bitdelta"] = "bitdelta"
    paper: ClassVar[str | None] = PAPER
    scale_multiplier: float = 1.0
    bits: int = Field(1, ge=1, le=8)
    group: Literal["tensor", "row"] = "tensor"
    distill: Distill | None = None

    prepasses: ClassVar[tuple[Prepass, ...]] = ("distill",)

    def prepass(self) -> Prepass | None:
        return "distill" if self.distill is not None else None

    def per_row(self) -> bool:
        return self.group == "row"

    def part_specs(self, shape: tuple[int, ...], run: object = None) -> dict[str, tuple[str, tuple[int, ...]]]:
        return part_specs(shape, self.bits, self.group)

    def codec_params(self, shape: tuple[int, ...], run: object = None) -> dict:
        return {"codec": "bitdelta", "bits": self.bits, "group": self.group}

    def encode(self, delta: torch.Tensor, ctx: TensorContext) -> dict[str, torch.Tensor]:
        """Sign planes and scales; `ctx.run`, when distillation ran, holds the learned scales."""
        packed, scale = binarize(delta, self.bits, self.group, self.scale_multiplier)
        parts = {"packed": packed, "scale": scale}
        if isinstance(ctx.run, torch.Tensor):
            parts["scale"] = ctx.run.to(device=scale.device, dtype=torch.float32).reshape(scale.shape)
        if self.bits == 1 and self.scale_multiplier != 0:
            # Diagnostics for the error statistics, in closed form (no decode): with S = sign(δ),
            # ⟨δ, αS⟩ = α·Σ|δ| and ‖αS‖² = n·α² per group. Keys starting with "_" are never stored.
            count = delta.shape[-1] if self.group == "row" else delta.numel()
            abs_sum = scale[0].double() / self.scale_multiplier * count
            a = parts["scale"][0].double()
            parts["_dot"] = (a * abs_sum).sum()
            parts["_sq"] = (a * a).sum() * count
        return parts

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], run: object = None) -> torch.Tensor:
        return decode_parts(parts, shape)

    def describe(self) -> str:
        extra = []
        if self.bits != 1:
            extra.append(f"{self.bits} bits")
        if self.group != "tensor":
            extra.append(f"per-{self.group} scales")
        if self.scale_multiplier != 1.0:
            extra.append(f"scale ×{self.scale_multiplier:g}")
        if self.distill is not None:
            extra.append(f"scales distilled {self.distill.steps} steps")
        return "BitDelta 1-bit delta" + (f" ({', '.join(extra)})" if extra else "")
