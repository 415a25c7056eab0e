"""What every edit is: a typed config that maps a float32 delta to a float32 delta.

An edit sees one tensor's delta (or a contiguous block of it, when `elementwise`), plus a
`TensorContext` naming the tensor and where the block sits in it. Edits are pure functions of
(config, delta, context): randomness comes only from `ctx.seed_key` so results never depend on
tensor order, shard layout or the number of processes.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class TensorContext:
    name: str
    shape: tuple[int, ...]
    offset: int = 0  # flat index of the block's first element within the whole tensor
    # What the step's `prepare` gathered over the whole tensor (set by the engine for a step with
    # `streams`, which then gets blocks); None: the step gets the whole tensor.
    state: object = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def seed_key(self, seed: int) -> int:
        """A stable 63-bit key for (seed, tensor name), the same on every machine and run."""
        digest = hashlib.sha256(f"{seed}\0{self.name}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class EditConfig(BaseModel):
    """Base of every edit's config. Subclasses set `op` (YAML key = registry key = module name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str  # a Literal["name"] in each subclass
    include: list[str] | None = None
    exclude: list[str] | None = None

    # Glob defaults over tensor names when the recipe gives none.
    default_include: ClassVar[tuple[str, ...]] = ("*",)
    default_exclude: ClassVar[tuple[str, ...]] = ()
    # True when the edit maps each element independently of the others (so it can run per block).
    elementwise: ClassVar[bool] = True
    # A non-elementwise edit that can still run per block once `prepare(blocks, ctx)` has gathered
    # its tensor-wide statistics over a streamed pre-pass (then `apply` gets ctx.state).
    streams: ClassVar[bool] = False
    # Edits that only touch floating tensors of these ranks (None = any rank).
    ranks: ClassVar[tuple[int, ...] | None] = None

    def applies_to(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.ranks is not None and len(shape) not in self.ranks:
            return False
        include = self.include if self.include is not None else list(self.default_include)
        exclude = self.exclude if self.exclude is not None else list(self.default_exclude)
        return matches(name, include) and not matches(name, exclude)

    def apply(self, delta: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """A short plain-words description for plans and model cards."""
        params = self.model_dump(exclude={"op", "include", "exclude"}, exclude_none=True)
        inner = ", ".join(f"{k}={v}" for k, v in params.items())
        return f"{self.op}({inner})"

    def recipe_form(self) -> dict:
        """The YAML form `{op: {params}}` of this edit, defaults filled in."""
        return {self.op: self.model_dump(exclude={"op"}, exclude_none=True)}
