"""Sparse storage for sparse edits (DARE, magnitude, breadcrumbs, DELLA, TIES): pure encode/decode.

A sparse tensor stores where the output differs from the base and the output's values there:
`W.values` [k] in the output dtype, and the positions, Elias–Fano coded (`W.index`, ≈ 2 + log2(n/k)
bits per position) or as a bitmap (`W.mask`, one bit per element), whichever is smaller. Rebuilding
is the base in the output dtype with those values put back: the dense output's bytes exactly, so a
reconstruction equals `format: dense` bit for bit. Positions are compared as bits, so a value that
only changes sign of zero, or a NaN payload, is stored too.
"""

from __future__ import annotations

import math

import torch

from typing import Iterator

from weightx.formats.packing import EF_CHUNK, ef_decode, ef_encode, ef_encode_chunks, ef_nbytes, pack_bits, packed_len, unpack_bits

INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def position_kind(n: int, k: int) -> str:
    """'index' (Elias–Fano) or 'mask' (bitmap): the smaller coding of k positions out of n."""
    return "index" if ef_nbytes(n, k) <= packed_len(n) else "mask"


def part_specs(shape: tuple[int, ...], dtype: str, k: int, positions: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (safetensors dtype, shape) of the stored parts of one sparse tensor."""
    n = math.prod(shape)
    size = ef_nbytes(n, k) if positions == "index" else packed_len(n)
    return {"values": (dtype, (k,)), positions: ("U8", (size,))}


def stored_nbytes(n: int, k: int, itemsize: int) -> int:
    return k * itemsize + min(ef_nbytes(n, k), packed_len(n))


def differing(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Flat positions where two same-dtype tensors differ bit for bit."""
    view = INT_VIEWS[out.element_size()]
    return torch.nonzero(out.reshape(-1).view(view) != base.reshape(-1).view(view)).reshape(-1)


def encode_positions(pos: torch.Tensor, n: int, kind: str) -> torch.Tensor:
    if kind == "index":
        return ef_encode(pos, n)
    bits = torch.zeros(n, dtype=torch.bool, device=pos.device)
    bits[pos.to(torch.int64)] = True
    return pack_bits(bits)


def decode_positions(code: torch.Tensor, n: int, k: int, kind: str) -> torch.Tensor:
    """The k sorted flat positions; ValueError when the code is not a valid one for (n, k)."""
    if kind == "index":
        pos = ef_decode(code, n, k) if k else torch.zeros(0, dtype=torch.int64)
        if k and (int(pos[-1]) >= n or bool((pos[1:] <= pos[:-1]).any())):
            raise ValueError(f"corrupt position code: positions out of order or past {n}")
        return pos
    pos = torch.nonzero(unpack_bits(code, n)).reshape(-1)
    if pos.numel() != k:
        raise ValueError(f"corrupt position mask: {pos.numel()} bits set where {k} values are stored")
    return pos


def mask_positions(mask: torch.Tensor, n: int, chunk: int = EF_CHUNK) -> Iterator[torch.Tensor]:
    """The set positions of a packed bitmap of n bits, in order, as int64 chunks of exactly `chunk`
    (the last may be shorter): what `ef_encode_chunks` takes, without every position in memory at once."""
    pending: list[torch.Tensor] = []
    have = 0
    step = 1 << 20  # bits unpacked at a time (a multiple of 8)
    for s in range(0, n, step):
        c = min(step, n - s)
        pos = torch.nonzero(unpack_bits(mask[s // 8:s // 8 + packed_len(c)], c)).reshape(-1) + s
        pending.append(pos)
        have += pos.numel()
        while have >= chunk:
            flat = torch.cat(pending)
            yield flat[:chunk]
            pending, have = [flat[chunk:]], have - chunk
    if have:
        yield torch.cat(pending)


def mask_to_index(mask: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The Elias–Fano code of the k positions set in a packed bitmap of n bits."""
    return ef_encode_chunks(mask_positions(mask, n), n, k, mask.device)


def rebuild(base: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The output: `base` (already in the output dtype, flat) with `values` at `pos`; a new tensor."""
    out = base.reshape(-1).clone()
    out[pos] = values.to(out.dtype)
    return out


__all__ = ["decode_positions", "differing", "encode_positions", "mask_positions", "mask_to_index", "part_specs", "position_kind",
           "rebuild", "stored_nbytes"]
