"""Ternary deltas (ComPEFT): keep the top-`density` |δ|, replace them by ±α·s, zero the rest.

Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization" (arXiv 2311.13171). δ̂_i = α·s·sign(δ_i) on the kept entries, 0
elsewhere, with
- `scale: std` (ComPEFT): s = std(δ) of the **unpruned** delta, ddof = 1 (torch's default, as the
  reference); α (`alpha`) is ComPEFT's tuned multiplier, 1.0 by default;
- `scale: mean_abs_kept`: s = mean |δ_kept|, the L2-optimal scale for the chosen support and signs
  (STC done right; the reference's STC mode uses the signed mean, a bug).

Selection is `weightx.kernels.topk`: exactly k = ⌊density·n⌋ (at least 1) entries, ties broken by lowest
flat index. The reference keeps int(d·n) + 1 (an off-by-one it shares with TIES). Exact zeros are
never kept: they have no sign, and ±s would change them.

**Per tensor by default; `scope: global` is ComPEFT's own mode.** The reference ranks every entry
of the model together (one threshold, one σ over the flattened, name-sorted state dict). weightx
defaults to selecting and scaling each tensor on its own, because (1) a global threshold lets the
layers with the largest deltas take the whole budget and can empty matrices whose deltas are small
but matter (deltas differ across layers by an order of magnitude), (2) one σ gives small-delta
layers a step far larger than their own deltas, and (3) per-tensor statistics stream: no pass
over the model before writing, and the artifact's size follows from the headers alone.
`scope: global` (`weightx.pipeline.global_ternary`) reads the selected tensors twice more before writing:
once for a histogram of |δ| and the global σ, once to pin the exact threshold; ties at it go to the
lowest (tensor in name order, flat index). Both modes agree on a single tensor.

Storage (`output.format: delta`), fixed size from (n, k): `W.packed` uint8 [⌈k/8⌉], the signs of
the kept entries in position order (bit = 1 means +); `W.mask` uint8, the kept positions
Elias–Fano coded (`weightx.formats.packing`: ≈ 2 + log2(1/density) bits per kept entry, 0.85 bit per
weight at density 0.2 instead of a 1-bit non-zero plane); `W.scale` float32 [1] = α·s. At density
0.2 that is 1.05 bits per weight, 1/15.2 of a bf16 delta. If fewer than k entries are non-zero the
last position is repeated (decoding writes the same value twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from weightx.edits.base import CodecEdit, Prepass, TensorContext
from weightx.formats.ternary import ABS_BITS, decode_parts, deternarize, part_specs, positions_at, ternarize, ternary_scale
from weightx.kernels.topk import keep_count

__all__ = ["Ternary", "GlobalSelection", "ABS_BITS", "decode_parts", "deternarize", "positions_at", "ternarize", "ternary_scale"]

PAPER = "https://arxiv.org/abs/2311.13171"


@dataclass(frozen=True)
class GlobalSelection:
    """`scope: global`, one tensor's share of the model-wide selection (`weightx.pipeline.global_ternary`):
    keep |δ| above `threshold` (float32 bits of |x|) plus the first `ties` entries equal to it, `k` in
    all, each stored as ±`scale`."""

    threshold: int
    ties: int
    k: int
    scale: float


class Ternary(CodecEdit):
    op: Literal["ternary"] = "ternary"
    paper: ClassVar[str | None] = PAPER
    density: float = Field(0.2, gt=0.0, le=1.0)
    scale: Literal["std", "mean_abs_kept"] = "std"
    alpha: float = 1.0
    scope: Literal["tensor", "global"] = "tensor"

    prepasses: ClassVar[tuple[Prepass, ...]] = ("global_statistics",)

    def prepass(self) -> Prepass | None:
        return "global_statistics" if self.scope == "global" else None

    def keep(self, shape: tuple[int, ...], run: object = None) -> int:
        """Entries kept: ⌊density·n⌋ per tensor; in global mode the count the statistics pass found
        (before it has run: the per-tensor count, as a size estimate)."""
        if isinstance(run, GlobalSelection):
            return run.k
        return keep_count(self.density, math.prod(shape))

    def part_specs(self, shape: tuple[int, ...], run: object = None) -> dict[str, tuple[str, tuple[int, ...]]]:
        return part_specs(shape, self.keep(shape, run))

    def codec_params(self, shape: tuple[int, ...], run: object = None) -> dict:
        return {"codec": "ternary", "k": self.keep(shape, run)}

    def encode(self, delta: torch.Tensor, ctx: TensorContext) -> dict[str, torch.Tensor]:
        diagnostics: dict[str, torch.Tensor] = {}
        shape = tuple(delta.shape)
        if self.scope == "global":
            sel = ctx.run
            if not isinstance(sel, GlobalSelection):
                raise RuntimeError(f"ternary scope: global has no statistics for {ctx.name}; the global statistics pass must run first")
            out = ternarize(delta, sel.k, self.scale, self.alpha, diagnostics, threshold=(sel.threshold, sel.ties), scale_value=sel.scale)
        else:
            out = ternarize(delta, self.keep(shape), self.scale, self.alpha, diagnostics)
        signs, positions, scale = out
        return {"packed": signs, "mask": positions, "scale": scale, **diagnostics}

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], run: object = None) -> torch.Tensor:
        return decode_parts(parts, shape, k=self.keep(shape, run))

    def describe(self) -> str:
        a = f"{self.alpha:g}·" if self.alpha != 1.0 else ""
        s = "σ" if self.scale == "std" else "mean|kept|"
        where = ", one threshold and scale for all tensors" if self.scope == "global" else ""
        return f"ternary (ComPEFT) density {self.density:g}, ±{a}{s}{where}"
