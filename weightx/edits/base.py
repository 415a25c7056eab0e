"""What every edit is: a typed config that maps a float32 delta to a float32 delta.

An edit sees one tensor's delta (or a contiguous block of it, when `elementwise`), plus a
`TensorContext` naming the tensor and where the block sits in it. Edits are pure functions of
(config, delta, context): randomness comes only from `ctx.seed_key` so results never depend on
tensor order, shard layout or the number of processes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

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
    # This tensor's entry in the run state for the step (`weightx.pipeline.state.RunState`): what a
    # pre-run phase learned for it (distilled BitDelta scales, a global ternary selection), or None.
    run: object = field(default=None, compare=False, repr=False)
    # The alias of the delta an edit runs on (None for a combine): random edits without an explicit
    # seed mix it into their key, so two deltas get independent masks.
    delta: str | None = None
    # A combine that needs the base itself, not only the deltas (linear without normalising, slerp),
    # reads its block here, float32, in the deltas' layout; it must not modify it.
    base: object = field(default=None, compare=False, repr=False)
    # The matrix stores its outputs along the last axis (transformers' Conv1D, GPT-OSS's stacked experts):
    # per-row codecs then work on its transpose, so their rows are still the outputs.
    columns: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def seed_key(self, seed: int | None) -> int:
        """A stable 63-bit key for (seed, tensor name), the same on every machine and run.

        `seed=None` (the default of the random edits) keys by (delta alias, tensor name) instead:
        each delta gets its own mask, as the DARE paper assumes and mergekit's unseeded draws give,
        reproducibly. An explicit seed keys by the seed only, so deltas sharing it share masks."""
        text = f"{seed}\0{self.name}" if seed is not None else f"delta={self.delta}\0{self.name}"
        digest = hashlib.sha256(text.encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class RandomDrop:
    """An edit that is δ ← (δ with the entries `rng.keep_words(ctx.seed_key(seed), …, drop)` drops set
    to +0.0) · factor, the factor skipped when it is 1: DARE with k = 0 and an elementwise rescale."""

    drop: float
    factor: float
    seed: int | None


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# What compression leaves whole by default: embeddings and position tables, lm_head, norms, biases, MoE routers.
NOT_LAYER = re.compile(r"(embed|\bwte\b|\bwpe\b|word_embeddings|lm_head|embed_out|(^|\.)output\.weight$|norm|(^|\.)ln_|bias|router"
                       r"|position|(^|\.)gate\.weight$|_gate\.weight$)")


def is_layer_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A weight matrix of a layer: 2-D (linear, Conv1D) or 3-D (stacked experts), and not an embedding,
    lm_head, norm, bias or router. The compressing edits' default; `weightx plan` counts coverage by it."""
    return len(shape) in (2, 3) and not NOT_LAYER.search(name)


# Run-level phases before any write: BitDelta's scale distillation (needs the whole model in
# memory) and the global ternary statistics (two read passes over the selected tensors).
Prepass = Literal["distill", "global_statistics"]


class EditConfig(BaseModel):
    """Base of every edit's config. Subclasses set `op` (YAML key = registry key = module name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str  # a Literal["name"] in each subclass
    include: list[str] | None = None
    exclude: list[str] | None = None

    paper: ClassVar[str | None] = None  # the method's paper, for model cards
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
    # A compressing edit (`CodecEdit`): `output.format: delta` stores its parts instead of the tensor.
    compresses: ClassVar[bool] = False
    # The run-level phases this edit can ask for before anything is written (see `prepass`).
    prepasses: ClassVar[tuple[Prepass, ...]] = ()

    def prepass(self) -> Prepass | None:
        """The run-level phase this configured edit needs before writing (one of `prepasses`), or None."""
        return None

    def linear_factor(self) -> float | None:
        """c when this configured edit is δ ← c·δ (then the engine may fuse it into one pass over
        the inputs, `weightx.kernels.fused`); None otherwise."""
        return None

    def random_drop(self) -> RandomDrop | None:
        """This configured edit as a `RandomDrop` (then the engine may fuse it too); None otherwise."""
        return None

    def kept_fraction(self) -> float | None:
        """The share of entries this configured edit leaves non-zero, for storing its output sparsely
        (`format: delta` without a compressing edit); None: it does not zero entries."""
        return None

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


class Codec(Protocol):
    """What a compressing edit implements: its stored parts, their encoding and decoding.

    `run` is the tensor's run-state entry (`TensorContext.run`); codecs whose layout depends on a
    pre-run phase (global ternary: the kept count) read it, the others ignore it."""

    op: str

    def part_specs(self, shape: tuple[int, ...], run: object = None) -> dict[str, tuple[str, tuple[int, ...]]]: ...

    def codec_params(self, shape: tuple[int, ...], run: object = None) -> dict: ...

    def encode(self, delta: torch.Tensor, ctx: TensorContext) -> dict[str, torch.Tensor]: ...

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], run: object = None) -> torch.Tensor: ...


class CodecEdit(EditConfig):
    """Base of the compressing edits (the `Codec` protocol): the dense result is decode(encode(δ)),
    literally, so a dense output equals a reconstruction from the artifact bit for bit."""

    elementwise: ClassVar[bool] = False
    compresses: ClassVar[bool] = True

    def applies_to(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.include is None:  # the default: every layer weight (minus `exclude`)
            exclude = self.exclude if self.exclude is not None else list(self.default_exclude)
            return is_layer_weight(name, shape) and not matches(name, exclude)
        return len(shape) >= 1 and super().applies_to(name, shape)

    def per_row(self) -> bool:
        """True when the codec keeps one scale per row of the stored matrix (its last axis = inputs)."""
        return False

    def part_specs(self, shape: tuple[int, ...], run: object = None) -> dict[str, tuple[str, tuple[int, ...]]]:
        raise NotImplementedError

    def codec_params(self, shape: tuple[int, ...], run: object = None) -> dict:
        raise NotImplementedError

    def encode(self, delta: torch.Tensor, ctx: TensorContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], run: object = None) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, delta: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        if ctx.columns and self.per_row() and delta.dim() >= 2:
            d = delta.transpose(-1, -2).contiguous()
            return self.decode(self.encode(d, ctx), tuple(d.shape), ctx.run).to(delta.device).transpose(-1, -2).contiguous()
        return self.decode(self.encode(delta, ctx), tuple(delta.shape), ctx.run).to(delta.device)
