"""Ternary (ComPEFT) storage: kept positions Elias–Fano coded, their signs, one scale. Pure encode/decode.

`W.packed` uint8 [⌈k/8⌉] signs of the kept entries in position order (bit = 1 means +); `W.mask`
uint8, the kept positions (`weightx.formats.packing`); `W.scale` float32 [1] = α·s.
"""

from __future__ import annotations

import math

import torch

from weightx.formats.packing import ef_decode, ef_encode, ef_nbytes, pack_bits, packed_len, unpack_bits
from weightx.kernels.topk import topk_mask


def part_specs(shape: tuple[int, ...], k: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The stored parts of one tensor with k kept entries: name → (safetensors dtype, shape)."""
    return {"packed": ("U8", (packed_len(k),)), "mask": ("U8", (ef_nbytes(math.prod(shape), k),)), "scale": ("F32", (1,))}


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
        if int(pos[-1]) >= n or bool((pos[1:] < pos[:-1]).any()):  # a damaged code must not write elsewhere
            raise ValueError(f"corrupt position code: positions out of order or past {n}")
        positive = unpack_bits(signs, k).to(dev)
        a = scale.reshape(())
        out[pos] = torch.where(positive, a, -a)
    return out.reshape(shape)


def decode_parts(parts: dict[str, torch.Tensor], shape: tuple[int, ...], *, k: int, **_: object) -> torch.Tensor:
    """Stored parts → dense float32 delta (used by the edit and by the artifact reader)."""
    return deternarize(parts["packed"], parts["mask"], parts["scale"].to(torch.float32), tuple(shape), k)
