"""Ternary deltas (ComPEFT): keep the top-`density` |δ|, replace them by ±α·s, zero the rest.

Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization" (arXiv 2311.13171). δ̂_i = α·s·sign(δ_i) on the kept entries, 0
elsewhere, with
- `scale: std` (ComPEFT): s = std(δ) of the **unpruned** delta, ddof = 1 (torch's default, as the
  reference); α (`alpha`) is ComPEFT's tuned multiplier, 1.0 by default;
- `scale: mean_abs_kept`: s = mean |δ_kept|, the L2-optimal scale for the chosen support and signs
  (STC done right; the reference's STC mode uses the signed mean, a bug).

Selection is `weightx.topk`: exactly k = ⌊density·n⌋ (at least 1) entries, ties broken by lowest
flat index. The reference keeps int(d·n) + 1 (an off-by-one it shares with TIES). Exact zeros are
never kept: they have no sign, and ±s would change them.

**Per tensor by default; `scope: global` is ComPEFT's own mode.** The reference ranks every entry
of the model together (one threshold, one σ over the flattened, name-sorted state dict). weightx
defaults to selecting and scaling each tensor on its own, because (1) a global threshold lets the
layers with the largest deltas take the whole budget and can empty matrices whose deltas are small
but matter (deltas differ across layers by an order of magnitude), (2) one σ gives small-delta
layers a step far larger than their own deltas, and (3) per-tensor statistics stream: no pass
over the model before writing, and the artifact's size follows from the headers alone.
`scope: global` (`weightx.global_ternary`) reads the selected tensors twice more before writing:
once for a histogram of |δ| and the global σ, once to pin the exact threshold; ties at it go to the
lowest (tensor in name order, flat index). Both modes agree on a single tensor.

Storage (`output.format: delta`), fixed size from (n, k): `W.packed` uint8 [⌈k/8⌉], the signs of
the kept entries in position order (bit = 1 means +); `W.mask` uint8, the kept positions
Elias–Fano coded (`weightx.packing`: ≈ 2 + log2(1/density) bits per kept entry, 0.85 bit per
weight at density 0.2 instead of a 1-bit non-zero plane); `W.scale` float32 [1] = α·s. At density
0.2 that is 1.05 bits per weight, 1/15.2 of a bf16 delta. If fewer than k entries are non-zero the
last position is repeated (decoding writes the same value twice).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr

from weightx.edits.base import EditConfig, TensorContext
from weightx.edits.bitdelta import LINEAR_PROJ
from weightx.packing import ef_decode, ef_encode, ef_nbytes, pack_bits, packed_len, unpack_bits
from weightx.topk import keep_count, topk_mask

PAPER = "https://arxiv.org/abs/2311.13171"


def ternary_scale(delta: torch.Tensor, kept: torch.Tensor, scale: str, alpha: float) -> float:
    """α·s in float64 (s from the unpruned delta for `std`, from the kept entries for `mean_abs_kept`)."""
    if scale == "std":
        # torch accumulates fp32 variance in double on CPU; no float64 copy of a large tensor needed.
        s = float(delta.std()) if delta.numel() > 1 else 0.0
    else:
        s = float(kept.to(torch.float64).abs().mean()) if kept.numel() else 0.0
    return alpha * s


ABS_BITS = 0x7FFFFFFF  # |x| as int32 orders like the value for float32


def positions_at(flat: torch.Tensor, threshold: int, ties: int) -> torch.Tensor:
    """Sorted positions with |x| above `threshold` (float32 bits of |x|), plus the first `ties` equal to it."""
    mags = flat.contiguous().view(torch.int32).bitwise_and(ABS_BITS)
    keep = mags > threshold
    if ties and threshold > 0:  # zeros are never kept
        keep[torch.nonzero(mags == threshold).reshape(-1)[:ties]] = True
    return torch.nonzero(keep).reshape(-1)


def ternarize(
    delta: torch.Tensor, k: int, scale: str = "std", alpha: float = 1.0, diagnostics: dict | None = None,
    *, threshold: tuple[int, int] | None = None, scale_value: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """δ → (signs uint8 [⌈k/8⌉], positions uint8 (Elias–Fano), scale float32 [1]).

    `threshold` = (bits, ties) and `scale_value` replace the per-tensor selection and scale (global
    mode). `diagnostics`, if given, receives ⟨δ, δ̂⟩ and ‖δ̂‖² ("_dot", "_sq") for error statistics.
    """
    flat = delta.reshape(-1).to(torch.float32)
    n = flat.numel()
    if threshold is None:
        pos = torch.nonzero(topk_mask(flat, k).logical_and_(flat != 0)).reshape(-1)
    else:
        pos = positions_at(flat, *threshold)
        if pos.numel() != k:
            raise RuntimeError(f"global ternary: {pos.numel()} entries pass the threshold where {k} were counted")
    values = flat[pos]
    s = ternary_scale(flat, values, scale, alpha) if scale_value is None else scale_value
    positive = values >= 0
    if diagnostics is not None:
        s32 = float(torch.tensor(s, dtype=torch.float32))
        diagnostics["_dot"] = torch.tensor(s32 * float(values.abs().sum(dtype=torch.float64)), dtype=torch.float64)
        diagnostics["_sq"] = torch.tensor(values.numel() * s32 * s32, dtype=torch.float64)
    if pos.numel() < k:  # fewer non-zeros than slots: repeat the last one (or 0 for an all-zero delta)
        fill = k - pos.numel()
        last = pos[-1:] if pos.numel() else torch.zeros(1, dtype=torch.int64, device=flat.device)
        pos = torch.cat([pos, last.expand(fill)])
        last_sign = positive[-1:] if positive.numel() else torch.ones(1, dtype=torch.bool, device=flat.device)
        positive = torch.cat([positive, last_sign.expand(fill)])
    scale_t = torch.tensor([s], dtype=torch.float32, device=flat.device)
    return pack_bits(positive), ef_encode(pos, n), scale_t


def deternarize(signs: torch.Tensor, positions: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], k: int) -> torch.Tensor:
    """The dense float32 delta: ±scale at the positions, +0.0 elsewhere."""
    n = 1
    for s in shape:
        n *= s
    dev = scale.device
    out = torch.zeros(n, dtype=torch.float32, device=dev)
    if k:
        pos = ef_decode(positions, n, k).to(dev)
        positive = unpack_bits(signs, k).to(dev)
        a = scale.reshape(())
        out[pos] = torch.where(positive, a, -a)
    return out.reshape(shape)


class Ternary(EditConfig):
    op: Literal["ternary"] = "ternary"
    density: float = Field(0.2, gt=0.0, le=1.0)
    scale: Literal["std", "mean_abs_kept"] = "std"
    alpha: float = 1.0
    scope: Literal["tensor", "global"] = "tensor"

    default_include: ClassVar[tuple[str, ...]] = LINEAR_PROJ
    elementwise: ClassVar[bool] = False
    compresses: ClassVar[bool] = True

    # scope: global, set by weightx.global_ternary before writing: per tensor (threshold bits, ties
    # to keep, kept count), the one scale α·s, and the record for weightx.json.
    _global: dict[str, tuple[int, int, int]] = PrivateAttr(default_factory=dict)
    _global_scale: float | None = PrivateAttr(default=None)
    _global_record: dict | None = PrivateAttr(default=None)

    def applies_to(self, name: str, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 1 and super().applies_to(name, shape)

    def keep(self, shape: tuple[int, ...], name: str | None = None) -> int:
        """Entries kept: ⌊density·n⌋ per tensor; in global mode the count found for `name` (until
        the statistics pass has run: the per-tensor count, as a size estimate)."""
        if self.scope == "global" and name in self._global:
            return self._global[name][2]
        return keep_count(self.density, math.prod(shape))

    def part_specs(self, shape: tuple[int, ...], name: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
        k = self.keep(shape, name)
        return {"packed": ("U8", (packed_len(k),)), "mask": ("U8", (ef_nbytes(math.prod(shape), k),)), "scale": ("F32", (1,))}

    def codec_params(self, shape: tuple[int, ...], name: str | None = None) -> dict:
        return {"codec": "ternary", "k": self.keep(shape, name)}

    def encode(self, delta: torch.Tensor, ctx: TensorContext) -> dict[str, torch.Tensor]:
        diagnostics: dict[str, torch.Tensor] = {}
        shape = tuple(delta.shape)
        if self.scope == "global":
            if ctx.name not in self._global or self._global_scale is None:
                raise RuntimeError(f"ternary scope: global has no statistics for {ctx.name}; run weightx.global_ternary.prepare first")
            v, ties, k = self._global[ctx.name]
            out = ternarize(delta, k, self.scale, self.alpha, diagnostics, threshold=(v, ties), scale_value=self._global_scale)
        else:
            out = ternarize(delta, self.keep(shape), self.scale, self.alpha, diagnostics)
        signs, positions, scale = out
        return {"packed": signs, "mask": positions, "scale": scale, **diagnostics}

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], name: str | None = None) -> torch.Tensor:
        return decode_parts(parts, shape, k=self.keep(shape, name))

    def apply(self, delta: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return self.decode(self.encode(delta, ctx), tuple(delta.shape), ctx.name).to(delta.device)

    def describe(self) -> str:
        a = f"{self.alpha:g}·" if self.alpha != 1.0 else ""
        s = "σ" if self.scale == "std" else "mean|kept|"
        where = ", one threshold and scale for all tensors" if self.scope == "global" else ""
        return f"ternary (ComPEFT) density {self.density:g}, ±{a}{s}{where}"


def decode_parts(parts: dict[str, torch.Tensor], shape: tuple[int, ...], *, k: int, **_: object) -> torch.Tensor:
    """Stored parts → dense float32 delta (used by the edit and by the artifact reader)."""
    return deternarize(parts["packed"], parts["mask"], parts["scale"].to(torch.float32), tuple(shape), k)
