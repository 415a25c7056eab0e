"""Bit packing for compressed deltas: bit-planes and Elias–Fano coded positions, all in uint8.

Layout (the delta-artifact contract, docs/artifact-format.md): 8 booleans per byte, **LSB first, along the last
dimension**. Element `8·i + j` of a row is bit `j` (value `1 << j`) of byte `i` of that row. A row
whose length is not a multiple of 8 is padded with zero bits, so every row starts on a byte
boundary and `unpack_bits(pack_bits(b), n)` gives `b` back for any `n`.

On little-endian machines four consecutive bytes read as one int32 are BitDelta's reference word
(row `32·r + j` in bit `j` of the `r`-th int32 of the transposed mask), so this layout is the
reference's, transposed and split into bytes.

On CPU the work goes to numpy's `packbits`/`unpackbits` (C loops, ~20× faster than torch ops
there); on other devices plain torch bit operations do it in place. Both give the same bytes.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return s


def packed_len(n: int) -> int:
    """Bytes for `n` bits."""
    return (n + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool[..., n] → uint8[..., ceil(n/8)], LSB first along the last dimension, zero-padded."""
    if bits.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, got {bits.dtype}")
    if bits.dim() == 0:
        bits = bits.reshape(1)
    if bits.device.type == "cpu":
        return torch.from_numpy(np.packbits(bits.contiguous().numpy(), axis=-1, bitorder="little"))
    return _pack_torch(bits)


def _pack_torch(bits: torch.Tensor) -> torch.Tensor:
    x = bits.to(torch.uint8)
    pad = (-bits.shape[-1]) % 8
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(*x.shape[:-1], -1, 8)
    out = x[..., 0].clone()
    for j in range(1, 8):
        out.bitwise_or_(x[..., j] << j)
    return out


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8[..., ceil(n/8)] → bool[..., n]; the inverse of `pack_bits` (padding bits are dropped)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects a uint8 tensor, got {packed.dtype}")
    if packed.shape[-1] != packed_len(n):
        raise ValueError(f"{packed.shape[-1]} bytes along the last dimension cannot hold exactly {n} bits")
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.contiguous().numpy(), axis=-1, count=n, bitorder="little").view(np.bool_))
    return _unpack_torch(packed, n)


def _unpack_torch(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)).bitwise_and_(1).to(torch.bool)
    return bits.reshape(*packed.shape[:-1], -1)[..., :n]


# ---- Elias–Fano: k sorted positions in [0, n) in a fixed number of bytes -------------------------
#
# Each position p is split into a high part p >> L and L low bits. The low bits are stored verbatim
# (k·L bits); the high parts, non-decreasing, are stored in unary as a bitmap with bit (high_i + i)
# set (k + ((n − 1) >> L) bits). With L = ⌊log2(n/k)⌋ this costs at most 2 + ⌈log2(n/k)⌉ bits per
# position, within ~0.5–1.5 bits of the information-theoretic minimum log2 C(n, k) / k, and both
# directions are a handful of vectorised tensor ops. The size depends only on (n, k), so a plan can
# lay out shards from headers alone. Repeated positions are allowed (non-decreasing sequence).


def ef_low_bits(n: int, k: int) -> int:
    """The low-bit width L for k positions in [0, n)."""
    if k <= 0 or n <= k:
        return 0
    return int(math.floor(math.log2(n / k)))


def _ef_high_len(n: int, k: int, low: int) -> int:
    return 0 if k == 0 or n == 0 else k + ((n - 1) >> low)


def ef_nbytes(n: int, k: int) -> int:
    """Bytes of `ef_encode` for k positions in [0, n)."""
    low = ef_low_bits(n, k)
    return packed_len(_ef_high_len(n, k, low)) + packed_len(k * low)


EF_CHUNK = 1 << 20  # positions encoded at a time: a multiple of 8, so the packed low bits concatenate exactly


def ef_encode(positions: torch.Tensor, n: int) -> torch.Tensor:
    """Non-decreasing integer positions in [0, n) → uint8[ef_nbytes(n, k)]: the unary high bitmap, then the
    low bits."""
    k = positions.numel()
    chunks = (positions[s:s + EF_CHUNK] for s in range(0, k, EF_CHUNK))
    return ef_encode_chunks(chunks, n, k, positions.device)


def ef_encode_chunks(chunks: Iterable[torch.Tensor], n: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`ef_encode` of k positions given in order as chunks of EF_CHUNK (the last may be shorter): the
    scratch memory is one chunk's, whatever k."""
    low = ef_low_bits(n, k)
    dev = torch.device(device)
    high_len = _ef_high_len(n, k, low)
    high = torch.zeros(high_len, dtype=torch.bool, device=dev)
    lows = []
    s = 0
    for chunk in chunks:
        p = chunk.to(device=dev, dtype=torch.int64)
        if s + p.numel() > k or (p.numel() != EF_CHUNK and s + p.numel() != k):
            raise ValueError(f"ef_encode_chunks: chunks of {EF_CHUNK} positions expected, {k} in all")
        high[(p >> low) + torch.arange(s, s + p.numel(), device=dev)] = True
        if low:
            bits = torch.empty(p.numel(), low, dtype=torch.bool, device=dev)
            for j in range(low):
                bits[:, j] = (p >> j).bitwise_and_(1).to(torch.bool)
            lows.append(pack_bits(bits.reshape(-1)))
        s += p.numel()
    if s != k:
        raise ValueError(f"ef_encode_chunks: {s} positions given, {k} expected")
    parts = [pack_bits(high)] if high_len else []
    if low:
        parts.append(torch.cat(lows) if lows else torch.zeros(0, dtype=torch.uint8, device=dev))
    if not parts:
        return torch.zeros(0, dtype=torch.uint8, device=dev)
    return torch.cat(parts)


def ef_decode(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of `ef_encode`: int64 positions, non-decreasing."""
    if data.numel() != ef_nbytes(n, k):
        raise ValueError(f"{data.numel()} bytes is not an Elias–Fano code of {k} positions in [0, {n})")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=data.device)
    low = ef_low_bits(n, k)
    high_len = _ef_high_len(n, k, low)
    nh = packed_len(high_len)
    ones = torch.nonzero(unpack_bits(data[:nh], high_len)).reshape(-1)
    if ones.numel() != k:
        raise ValueError(f"corrupt Elias–Fano code: {ones.numel()} set bits where {k} positions were recorded")
    pos = (ones - torch.arange(k, device=data.device)) << low
    if low:
        bits = unpack_bits(data[nh:], k * low).reshape(k, low).to(torch.int64)
        pos += (bits << torch.arange(low, device=data.device)).sum(1)
    return pos
