"""What every combine is: a typed config reducing several edited deltas to one."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from weightx.edits.base import Prepass, TensorContext


class CombineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str  # a Literal["name"] in each subclass
    paper: ClassVar[str | None] = None  # the method's paper, for model cards
    elementwise: ClassVar[bool] = True
    streams: ClassVar[bool] = False  # see EditConfig.streams; `prepare(blocks, weights, ctx)`
    needs_base: ClassVar[bool] = False  # `combine` reads the base block (ctx.base) besides the deltas

    def kept_fraction(self) -> float | None:
        """As `EditConfig.kept_fraction`: the share of entries the combined delta keeps non-zero
        (an upper estimate), or None when the combine does not zero entries."""
        return None

    def prepass(self) -> Prepass | None:
        """The run-level phase this configured combine needs before writing, or None."""
        return None

    def linear(self, weights: list[float]) -> tuple[list[float], float | None] | None:
        """(w, W) when this configured combine is Σ_i w_i·δ_i computed as `weighted_sum` (then ÷ W,
        None: no division), so the engine may fuse it (`weightx.kernels.fused`); None otherwise."""
        return None

    def check(self, weights: list[float]) -> str | None:
        """What makes this combine unusable with these delta weights (one line saying what to
        change), or None; the recipe reports it before anything is read."""
        return None

    def combine(self, deltas: list[torch.Tensor], weights: list[float], ctx: TensorContext) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        params = self.model_dump(exclude={"op"}, exclude_none=True)
        return f"{self.op}({', '.join(f'{k}={v}' for k, v in params.items())})" if params else self.op

    def recipe_form(self) -> str | dict:
        params = self.model_dump(exclude={"op"}, exclude_none=True)
        return {self.op: params} if params else self.op
