"""DARE: Drop And REscale, with the Unified-View generalisation `k`.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch" (arXiv 2311.03099): drop each delta entry with probability p and rescale the survivors by
1/(1 − p), so E[δ̃] = δ and Var[δ̃ᵢ] = δᵢ²·p/(1 − p).

Tang et al., "A Unified View of Delta Parameter Editing" (arXiv 2410.13841):
a random fraction p is multiplied by k and the rest by (1 − k·p)/(1 − p); the expected factor is
still 1. k = 0 is DARE, k = 1 the identity.

`rescale` picks the survivors' factor: `inverse_keep` (the paper: (1 − k·p)/(1 − p)), `none`
(factor 1, plain dropping), or `l1` (mergekit's since its PR #245: survivors keep factor 1, then
the whole tensor is scaled so its L1 norm equals the input's; skipped when either norm is below
1e-7). `l1` needs tensor-wide norms, so it is the only setting that is not elementwise; the engine
gathers them in a pre-pass over blocks (`prepare`) from L1 sums of 32K-element chunks folded in
order, the same float64 sum as over the whole tensor when blocks are multiples of 32K.

Randomness: entry i of tensor `name` is dropped when u(seed, name, i) < p, with u from the
counter-based hash in `weightx.kernels.rng`; the mask is the same whatever the block size, tensor order,
shard layout, process count or device. It does not reproduce MergeLM's or mergekit's masks
(theirs come from torch's global generator). The `l1` norms are float64 sums: identical across
runs, layouts and thread counts here, but their summation order differs between CPU and CUDA, which
could in rare cases move the float32 scale by one ulp.
Without a `seed` (the default) a mask depends on (delta alias, tensor name): two deltas get
independent masks, reproducibly. An explicit `seed` keys by (seed, tensor name) only, so deltas
given the same seed share their masks (P(kept in 2 | kept in 1) = 1); that is how to ask for it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import field_validator
from pydantic_core import PydanticCustomError

from weightx.kernels import rng
from weightx.edits.base import EditConfig, RandomDrop, TensorContext
from weightx.kernels.topk import each_block

PAPER = "https://arxiv.org/abs/2311.03099"
UNIFIED_VIEW = "https://arxiv.org/abs/2410.13841"
L1_EPS = 1e-7  # mergekit's guard against rescaling (near-)empty tensors

Rescale = Literal["inverse_keep", "none", "l1"]


L1_CHUNK = 1 << 15  # divides the engine's block and rng chunk sizes; one intra-op thread's grain


def l1_chunks(x: torch.Tensor, chunk: int = L1_CHUNK) -> list[float]:
    """float64 Σ|x| of each successive chunk (no full-size temporary). A streamed tensor folds the
    chunk sums of its blocks in order, which is the same sum as over the whole tensor."""
    flat = x.reshape(-1)
    return [float(flat[s : s + chunk].abs().sum(dtype=torch.float64)) for s in range(0, flat.numel(), chunk)]


def l1_norm(x: torch.Tensor) -> float:
    """Σ|x| accumulated in float64, a chunk at a time."""
    return sum(l1_chunks(x))


def survivor_factor(drop: float, k: float, rescale: str) -> float:
    if rescale != "inverse_keep" or drop >= 1.0:
        return 1.0  # drop = 1 leaves no survivors (MergeLM returns zeros rather than divide by 0)
    return (1.0 - k * drop) / (1.0 - drop)


def dare_(
    delta: torch.Tensor,
    *,
    drop: float,
    key: int,
    offset: int = 0,
    rescale: Rescale = "inverse_keep",
    k: float = 0.0,
    sums: tuple[list[float], list[float]] | None = None,
) -> torch.Tensor:
    """DARE in place on `delta`, whose flat element j is element offset + j of the keyed tensor.

    Dropped ("selected") entries are multiplied by k, the others by `survivor_factor`; `l1` then
    rescales the whole of `delta` (meaningful when it is the whole tensor, offset 0). With `sums`
    (a block of a streamed tensor, see `dare_l1_scale`), `l1` appends the L1 chunk sums before and
    after to them instead of rescaling.
    """
    if drop == 0.0:
        return delta  # nothing is selected and the survivors' factor is exactly 1
    delta = delta.contiguous()
    flat = delta.view(-1)
    keep = survivor_factor(drop, k, rescale)
    sums_in, sums_out = sums if sums is not None else ([], [])
    chunks = rng.keep_words if k == 0.0 else rng.drop_chunks
    for s, mask in chunks(key, offset, flat.numel(), drop, flat.device):
        part = flat[s : s + mask.numel()]
        if rescale == "l1":
            sums_in += l1_chunks(part)
        if k == 0.0:
            part.view(torch.int32).bitwise_and_(mask)  # dropped entries become +0.0
            if keep != 1.0:
                part.mul_(keep)
        else:
            # One multiply per entry (k or the survivors' factor), so k = 0 written this way
            # rounds exactly like the branch above.
            part.mul_(torch.where(mask, k, keep).to(part.dtype))
        if rescale == "l1":
            sums_out += l1_chunks(part)
    if rescale == "l1" and sums is None:
        # Chunk sums folded in order: the same float64 sum whether the tensor came whole or in blocks.
        scale = l1_factor(sum(sums_in), sum(sums_out))
        if scale is not None:
            delta.mul_(scale)
    return delta


def l1_factor(norm_in: float, norm_out: float) -> float | None:
    """The factor restoring the L1 norm, or None when either norm is (near) zero."""
    return norm_in / norm_out if norm_in >= L1_EPS and norm_out >= L1_EPS else None


def dare_l1_scale(blocks, *, drop: float, key: int, k: float) -> float | None:
    """The `l1` factor of a streamed tensor: its blocks' chunk sums before and after, in order."""
    def chunk_sums(start: int, ds: list[torch.Tensor]) -> tuple[list[float], list[float]]:
        sums: tuple[list[float], list[float]] = ([], [])
        if drop != 0.0:
            dare_(ds[0], drop=drop, key=key, offset=start, rescale="l1", k=k, sums=sums)
        return sums

    before: list[float] = []
    after: list[float] = []
    for b, a in each_block(blocks, chunk_sums):  # folded in block order
        before += b
        after += a
    return l1_factor(sum(before), sum(after))


class Dare(EditConfig):
    op: Literal["dare"] = "dare"
    paper: ClassVar[str | None] = PAPER
    drop: float
    rescale: Rescale = "inverse_keep"
    k: float = 0.0
    seed: int | None = None  # None: independent per delta (see the module doc)

    def random_drop(self) -> RandomDrop | None:
        if self.k != 0.0 or not self.elementwise:
            return None
        return RandomDrop(self.drop, survivor_factor(self.drop, self.k, self.rescale), self.seed)

    def kept_fraction(self) -> float | None:
        return 1.0 - self.drop if self.k == 0.0 else None  # k ≠ 0 scales the dropped entries instead

    @field_validator("drop")
    @classmethod
    def _drop_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise PydanticCustomError(
                "dare_drop",
                "drop must satisfy 0 <= drop < 1 (the probability of dropping each delta entry; "
                "e.g. 0.9 keeps about 10%), got {value}",
                {"value": v},
            )
        return v

    @property
    def elementwise(self) -> bool:  # type: ignore[override]
        return self.rescale != "l1"  # l1 needs the whole tensor's norms

    streams: ClassVar[bool] = True  # `l1`: both norms from a pre-pass, then per block

    def apply(self, delta: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        streamed = ctx.state is not None and self.rescale == "l1"
        # A streamed `l1` block: survivors keep factor 1 ("none" does the same), then the whole
        # tensor's factor from `prepare`, the same multiply as on the whole tensor.
        delta = dare_(
            delta, drop=self.drop, key=ctx.seed_key(self.seed), offset=ctx.offset,
            rescale="none" if streamed else self.rescale, k=self.k,
        )
        if streamed and self.drop != 0.0 and ctx.state[0] is not None:
            delta.mul_(ctx.state[0])
        return delta

    def prepare(self, blocks, ctx: TensorContext) -> tuple[float | None]:
        return (dare_l1_scale(blocks, drop=self.drop, key=ctx.seed_key(self.seed), k=self.k),)

    def describe(self) -> str:
        extra = f", k={self.k:g}" if self.k != 0.0 else ""
        seed = f" seed={self.seed}" if self.seed is not None else ""
        return f"DARE drop={self.drop:g} rescale={self.rescale}{extra}{seed}"

