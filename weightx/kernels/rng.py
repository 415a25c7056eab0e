"""Counter-based random numbers: element i of a tensor gets a value that depends only on (key, i).

Random edits (DARE) must give the same mask whatever the block size, tensor order, shard layout,
process count or device. A stateful generator (torch.Generator, torch.bernoulli) cannot promise
that: its stream depends on how much was drawn before and differs between CPU and CUDA. Here each
element's value is a hash of (key, flat index), computed with integer tensor ops that are exact on
every device, so any block of any tensor can be drawn on its own.

The hash is two rounds of Wellons' "lowbias32" integer finaliser (a bijection on 32-bit words),
keyed before each round: h = f(f(i ⊕ k₀) ⊕ k₁), with k₀, k₁ two 32-bit words of the key
(`TensorContext.seed_key`, from sha256 of seed and tensor name). Indices ≥ 2³² fold their high word
into k₀. Values are computed in int32 tensors holding the words' bit patterns: products wrap
mod 2³² (two's complement, as every torch backend computes int32 multiplies), right shifts are made
logical by masking off the copied sign bits, and unsigned comparisons flip the sign bit first.
int32 is twice as fast as int64 emulation on CPU SIMD and native on GPUs.

Uniforms use the top 24 bits, u = (h >> 8) / 2²⁴, exact in float32; `drop_mask` compares the
integers directly (u < p ⇔ h < ⌈p·2²⁴⌉·2⁸), so P(drop) = ⌈p·2²⁴⌉/2²⁴, within 6e-8 of p.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np
import torch

M32 = 0xFFFFFFFF
MULTIPLIERS = (0x7FEB352D, 0x846CA68B)  # lowbias32's (Wellons, "Hash function prospector"); bf16_jit's too
_C1, _C2 = MULTIPLIERS
_GOLDEN = 0x9E3779B9
# Elements hashed at once (the values never depend on it). On CPU two 1 MB int32 buffers stay in
# a core's 1 MB L2 cache (256K: fewer numpy calls per block than 128K, which the block threads'
# GIL hand-offs pay for); on a GPU bigger chunks mean fewer kernel launches.
CHUNK = 1 << 18
GPU_CHUNK = 1 << 22
UNIFORM_BITS = 24


def _signed32(c: int) -> int:
    """The int32 with the bit pattern of the 32-bit word c."""
    c &= M32
    return c - (1 << 32) if c >= 1 << 31 else c


_S1, _S2 = _signed32(_C1), _signed32(_C2)
_SIGN = -(1 << 31)


def mix32(x: int) -> int:
    """lowbias32 on a Python int (the reference the tensor version must match)."""
    x &= M32
    x ^= x >> 16
    x = (x * _C1) & M32
    x ^= x >> 15
    x = (x * _C2) & M32
    x ^= x >> 16
    return x


def _xorshift_(h: torch.Tensor, tmp: torch.Tensor, s: int) -> None:
    """h ^= h >>> s (logical) on int32 bit patterns: the arithmetic shift's sign copies masked off."""
    torch.bitwise_right_shift(h, s, out=tmp)
    h.bitwise_xor_(tmp.bitwise_and_((1 << (32 - s)) - 1))


def _mix_(h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor of words; `tmp` is scratch of the same size."""
    _xorshift_(h, tmp, 16)
    h.mul_(_S1)
    _xorshift_(h, tmp, 15)
    h.mul_(_S2)
    _xorshift_(h, tmp, 16)
    return h


# On CPU the two rounds run in numpy on uint32 views of the same buffers: native unsigned words
# need no masking after shifts (8 ops a round instead of 11), 1.0 -> 0.7 ns per element a round.
# Same words bit for bit (tested against torch's path, which CUDA uses).
NUMPY_ON_CPU = True
_U1, _U2 = np.uint32(_C1), np.uint32(_C2)


def _np_mix_(h: np.ndarray, tmp: np.ndarray) -> None:
    """lowbias32 in place on a uint32 array; `tmp` is scratch of the same size."""
    for s, c in ((16, _U1), (15, _U2), (16, None)):
        np.bitwise_xor(h, np.right_shift(h, s, out=tmp), out=h)
        if c is not None:
            np.multiply(h, c, out=h)


def key_words(key: int, hi: int = 0) -> tuple[int, int]:
    """The two round keys for indices whose high 32-bit word is `hi`."""
    k0, k1 = key & M32, (key >> 32) & M32
    if hi:
        k0 = mix32(k0 ^ mix32(hi * _GOLDEN))
    return k0, k1


def _chunk(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else GPU_CHUNK


def hash_range(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """32-bit hashes (int64 tensor of values in [0, 2³²)) of flat indices start … start+count−1."""
    device = torch.device(device)
    out = torch.empty(count, dtype=torch.int64, device=device)
    step = _chunk(device)
    h, tmp = (torch.empty(min(count, step), dtype=torch.int32, device=device) for _ in range(2))
    for s in range(0, count, step):
        c = min(step, count - s)
        _hash_into(h[:c], tmp[:c], key, start + s)
        out[s : s + c] = h[:c]
        out[s : s + c].bitwise_and_(M32)
    return out


def _hash_into(h: torch.Tensor, tmp: torch.Tensor, key: int, start: int) -> None:
    """Words of the indices' hashes into the int32 tensor h (bit patterns; see the module doc)."""
    # Split at 2³¹ boundaries: every piece has one high word and an int32 arange (only tensors
    # over 2G elements have more than one).
    n, pos = h.numel(), 0
    while pos < n:
        i = start + pos
        hi, lo = i >> 32, i & M32
        c = min(n - pos, (1 << 31) - (lo & ((1 << 31) - 1)))
        k0, k1 = key_words(key, hi)
        piece, t = h[pos : pos + c], tmp[pos : pos + c]
        first = _signed32(lo)
        torch.arange(first, first + c, dtype=torch.int32, device=h.device, out=piece)
        if h.device.type == "cpu" and NUMPY_ON_CPU:
            u, ut = piece.numpy().view(np.uint32), t.numpy().view(np.uint32)
            _np_mix_(np.bitwise_xor(u, np.uint32(k0), out=u), ut)
            _np_mix_(np.bitwise_xor(u, np.uint32(k1), out=u), ut)
        else:
            _mix_(piece.bitwise_xor_(_signed32(k0)), t)
            _mix_(piece.bitwise_xor_(_signed32(k1)), t)
        pos += c


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 uniforms in [0, 1) on a 2⁻²⁴ grid for flat indices start … start+count−1."""
    h = hash_range(key, start, count, device)
    return h.bitwise_right_shift_(32 - UNIFORM_BITS).to(torch.float32).mul_(2.0**-UNIFORM_BITS)


def drop_threshold(p: float) -> int:
    """Hashes below this are dropped: u < p ⇔ h < ⌈p·2²⁴⌉·2⁸ (p·2²⁴ is exact in float64)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")
    return math.ceil(p * (1 << UNIFORM_BITS)) << (32 - UNIFORM_BITS)


def keep_threshold(p: float) -> int:
    """Dropped ⇔ the top UNIFORM_BITS of the hash (h >> 8) are below this (at most 2²⁴)."""
    return drop_threshold(p) >> (32 - UNIFORM_BITS)


_local = threading.local()


def _scratch(count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two int32 buffers and a bool buffer of ≥ count elements, reused per thread and device:
    fresh allocations per block cost more in page faults than the hash itself."""
    cache: dict = _local.__dict__.setdefault("bufs", {})
    bufs = cache.get(device)
    if bufs is None or bufs[0].numel() < count:
        n = max(count, 1 << 16)
        bufs = cache[device] = (
            torch.empty(n, dtype=torch.int32, device=device),
            torch.empty(n, dtype=torch.int32, device=device),
            torch.empty(n, dtype=torch.bool, device=device),
        )
    return bufs[0][:count], bufs[1][:count], bufs[2][:count]


def drop_chunks(key: int, start: int, count: int, p: float, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (position, bool mask) for successive chunks of the range; True (drop) with probability
    p. The mask is a reused buffer: use it before asking for the next chunk."""
    # Unsigned h < T as signed int32: flip both sign bits. T = 2³² (p = 1) drops everything.
    threshold = drop_threshold(p)
    device = torch.device(device)
    step = _chunk(device)
    for s in range(0, count, step):
        c = min(step, count - s)
        h, tmp, mask = _scratch(c, device)
        if threshold > M32:
            yield s, mask.fill_(True)
            continue
        _hash_into(h, tmp, key, start + s)
        yield s, torch.lt(h.bitwise_xor_(_SIGN), threshold + _SIGN, out=mask)


def keep_words(key: int, start: int, count: int, p: float, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """Like `drop_chunks`, as int32 words to AND with float32 bits: 0 where dropped, all ones
    where kept (no bool mask: masked_fill_ costs more than the hash on CPU)."""
    t24 = keep_threshold(p)  # drop ⇔ h >> 8 < t24, both below 2²⁴ + 1
    device = torch.device(device)
    step = _chunk(device)
    for s in range(0, count, step):
        c = min(step, count - s)
        h, tmp, _ = _scratch(c, device)
        _hash_into(h, tmp, key, start + s)
        # (h >>> 8) − t24 < 0 ⇔ drop; >> 31 spreads its sign: all ones (drop), then inverted.
        if device.type == "cpu" and NUMPY_ON_CPU:
            w = tmp.numpy()
            np.right_shift(h.numpy().view(np.uint32), 32 - UNIFORM_BITS, out=w.view(np.uint32))  # logical
            np.invert(np.right_shift(np.subtract(w, t24, out=w), 31, out=w), out=w)
            yield s, tmp
            continue
        torch.bitwise_right_shift(h, 32 - UNIFORM_BITS, out=tmp).bitwise_and_((1 << UNIFORM_BITS) - 1)
        yield s, tmp.sub_(t24).bitwise_right_shift_(31).bitwise_not_()


def drop_mask(key: int, start: int, count: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask, True with probability p independently per element (True = drop, as in DARE)."""
    out = torch.empty(count, dtype=torch.bool, device=device)
    for s, mask in drop_chunks(key, start, count, p, torch.device(device)):
        out[s : s + mask.numel()] = mask
    return out
