"""Model Breadcrumbs: drop the largest outliers and the smallest entries of each delta tensor.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks"
(arXiv 2312.06795). Per tensor of n entries, ranked by |δ| (ties by lowest flat index, as every
weightx top-k): the ⌊gamma·n⌋ largest are dropped as outliers, then the smallest, so that exactly
⌊density·n⌋ (at least 1) entries stay. When density + gamma > 1 fewer outliers are dropped, so the
kept count still holds (mergekit's `magnitude_outliers` does the same).

mergekit's `breadcrumbs` once kept `indices[n_bot:-n_top]`, which is empty when ⌊gamma·n⌋ = 0
(gamma = 0, or any tensor under 1/gamma entries: a 64-entry norm at gamma 0.01) and zeroed the whole
delta. weightx keeps the top ⌊density·n⌋ there, i.e. plain magnitude pruning (mergekit 0.1.5 does
too). Counts come from the decimals written (`weightx.kernels.topk.keep_count`); mergekit takes
int() of float products, which can differ by one entry.

Streams: both thresholds (the n_top-th and the (n_top + kept)-th largest) are found in one set of
pre-passes over blocks; a block keeps what lies between them.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar, Iterator, Literal

import torch
from pydantic import field_validator
from pydantic_core import PydanticCustomError

from weightx.edits.base import EditConfig, TensorContext
from weightx.edits.magnitude import check_density
from weightx.kernels.topk import Blocks, PooledBlocks, Selection, keep_count, select_blocks, trim_block_

PAPER = "https://arxiv.org/abs/2312.06795"


def counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries kept, outliers dropped above them) for a tensor of n entries."""
    kept = keep_count(density, n)
    top = math.floor(Fraction(str(gamma)) * n) if gamma > 0 else 0
    return kept, max(0, min(top, n - kept))


class _Twice(PooledBlocks):
    """The blocks of one tensor, handed out as two tensors, so one `select_blocks` finds both thresholds."""

    def __init__(self, blocks: Blocks):
        self.blocks = blocks

    def __call__(self, readonly: bool = False) -> Iterator[tuple[int, list[torch.Tensor]]]:
        inner = self.blocks(readonly) if isinstance(self.blocks, PooledBlocks) else self.blocks()
        return ((s, [xs[0], xs[0]]) for s, xs in inner)

    def imap(self, fn, readonly: bool = False):
        if isinstance(self.blocks, PooledBlocks):
            return self.blocks.imap(lambda s, xs: fn(s, [xs[0], xs[0]]), readonly)
        return (fn(s, xs) for s, xs in self(readonly))


def prepare_breadcrumbs(blocks: Blocks, n: int, density: float, gamma: float) -> tuple[Selection, Selection]:
    kept, top = counts(n, density, gamma)
    upper, outliers = select_blocks(_Twice(blocks), n, [top + kept, top])
    return upper, outliers


def breadcrumbs_(delta: torch.Tensor, density: float, gamma: float,
                 state: tuple[Selection, Selection] | None = None, start: int = 0) -> torch.Tensor:
    """In place: of the whole tensor, or with `state` of its block at flat index `start`."""
    flat = delta.contiguous().view(-1)
    if state is None:
        state = prepare_breadcrumbs(lambda: [(0, [flat])], flat.numel(), density, gamma)
    upper, outliers = state
    # The top `top` entries are a prefix of the top `top + kept` (one order: |δ| desc, index asc):
    # keep the larger set, then subtract the outliers (x − x = +0, x − 0 = x: exact).
    drop = trim_block_(flat.clone(), outliers, start) if outliers.k > 0 else None
    trim_block_(flat, upper, start)
    if drop is not None:
        flat.sub_(drop)
    return flat.view(delta.shape)


class Breadcrumbs(EditConfig):
    op: Literal["breadcrumbs"] = "breadcrumbs"
    paper: ClassVar[str | None] = PAPER
    density: float
    gamma: float = 0.01

    def kept_fraction(self) -> float | None:
        return self.density

    elementwise = False  # two thresholds of the whole tensor …
    streams = True  # … gathered over blocks by `prepare`

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        return check_density(v)

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise PydanticCustomError(
                "gamma_range",
                "gamma must satisfy 0 <= gamma < 1 (the fraction of largest entries dropped as outliers; "
                "the paper and mergekit use 0.01), got {value}", {"value": v})
        return v

    def apply(self, delta: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return breadcrumbs_(delta, self.density, self.gamma, ctx.state, ctx.offset)

    def prepare(self, blocks: Blocks, ctx: TensorContext) -> tuple[Selection, Selection]:
        return prepare_breadcrumbs(blocks, ctx.numel, self.density, self.gamma)

    def describe(self) -> str:
        return f"breadcrumbs density={self.density:g} gamma={self.gamma:g}"
