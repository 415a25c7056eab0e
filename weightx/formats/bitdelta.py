"""BitDelta's storage: sign planes plus scales, pure encode/decode (no config, no I/O).

`W.packed` uint8 [b, *shape[:-1], ⌈in/8⌉] sign planes (bit = 1 means +, sign(0) = +1), LSB first
along the last dimension; `W.scale` float32 [b] (one per plane) or [b, *shape[:-1]] (per row).
"""

from __future__ import annotations

import torch

from weightx.formats.packing import pack_bits, packed_len, unpack_bits


def part_specs(shape: tuple[int, ...], bits: int, group: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The stored parts of one tensor: name → (safetensors dtype, shape)."""
    rows = tuple(shape[:-1])
    return {
        "packed": ("U8", (bits, *rows, packed_len(shape[-1]))),
        "scale": ("F32", (bits,) if group == "tensor" else (bits, *rows)),
    }


def binarize(
    delta: torch.Tensor, bits: int = 1, group: str = "tensor", multiplier: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """δ (float32, rank ≥ 1) → (packed sign planes uint8 [bits, *rows, ⌈n/8⌉], scales float32).

    Scales have shape [bits] for `group="tensor"`, [bits, *rows] for `group="row"`.
    """
    r = delta.to(torch.float32)
    planes, scales = [], []
    for j in range(bits):
        positive = r >= 0  # sign(0) = +1
        # mean |r| as an L1 norm: one reduction, no |r| temporary the size of the matrix
        n = r.shape[-1] if group == "row" else r.numel()
        a = torch.linalg.vector_norm(r, 1) if group == "tensor" else torch.linalg.vector_norm(r, 1, dim=-1)
        a = a / n
        planes.append(pack_bits(positive))
        scales.append(a)
        if j + 1 < bits:
            step = _signed(positive, a if group == "tensor" else a.unsqueeze(-1))
            r = r - step if j == 0 else r.sub_(step)
    scale = torch.stack(scales)
    if multiplier != 1.0:
        scale = scale * multiplier
    return torch.stack(planes), scale.to(torch.float32)


def _signed(positive: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # torch.where picks a or -a exactly: no multiply, so the result is the stored scale bit for bit.
    return torch.where(positive, a, -a)


def debinarize(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Σ_j scale_j·S_j as float32 of `shape`; planes are added in order j = 0, 1, ... ."""
    bits = packed.shape[0]
    row_scales = scale.dim() > 1
    out = None
    for j in range(bits):
        positive = unpack_bits(packed[j], shape[-1]).to(scale.device)
        a = scale[j].unsqueeze(-1) if row_scales else scale[j]
        term = _signed(positive, a)
        out = term if out is None else out.add_(term)
    return out.reshape(shape)


def decode_parts(parts: dict[str, torch.Tensor], shape: tuple[int, ...], **_: object) -> torch.Tensor:
    """Stored parts → dense float32 delta (used by the edit and by the artifact reader)."""
    return debinarize(parts["packed"], parts["scale"].to(torch.float32), tuple(shape))
