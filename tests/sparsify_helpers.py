"""Independent numpy references for DARE / magnitude / TIES tests.

Written from the specs (module docstrings of weightx.kernels.rng, weightx.kernels.topk, weightx.combine.ties and
METHODS.md), never by calling the code under test: numpy uint32 arithmetic wraps natively, so the
hash here needs none of the int64 tricks the torch version uses, and top-k is a full stable sort.
"""

from __future__ import annotations

import hashlib

import numpy as np

U32 = np.uint32
C1, C2 = U32(0x7FEB352D), U32(0x846CA68B)


def seed_key(seed: int | None, name: str, delta: str | None = None) -> int:
    """An explicit seed keys by (seed, name); no seed by (delta alias, name)."""
    text = f"{seed}\0{name}" if seed is not None else f"delta={delta}\0{name}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def lowbias32(x: np.ndarray) -> np.ndarray:
    x = x.astype(U32)
    with np.errstate(over="ignore"):
        x ^= x >> U32(16)
        x *= C1
        x ^= x >> U32(15)
        x *= C2
        x ^= x >> U32(16)
    return x


def np_hash(key: int, start: int, count: int) -> np.ndarray:
    """h = f(f(i ⊕ k0) ⊕ k1) for flat indices below 2³² (what every test tensor uses)."""
    assert start + count <= 1 << 32
    k0, k1 = U32(key & 0xFFFFFFFF), U32((key >> 32) & 0xFFFFFFFF)
    i = np.arange(start, start + count, dtype=np.uint64).astype(U32)
    return lowbias32(lowbias32(i ^ k0) ^ k1)


def np_drop_mask(seed: int | None, name: str, count: int, p: float, start: int = 0, delta: str | None = None) -> np.ndarray:
    """u < p with u = (h >> 8) / 2²⁴, evaluated in float64."""
    u = (np_hash(seed_key(seed, name, delta), start, count) >> U32(8)).astype(np.float64) / 2.0**24
    return u < p


def np_dare(delta: np.ndarray, mask: np.ndarray, p: float, k: float = 0.0, rescale: str = "inverse_keep") -> np.ndarray:
    """DARE / Unified-View DARE on a given mask (True = selected/dropped), in float64."""
    d = delta.astype(np.float64).reshape(-1)
    keep = (1 - k * p) / (1 - p) if rescale == "inverse_keep" else 1.0
    out = np.where(mask.reshape(-1), k * d, keep * d)
    if rescale == "l1":
        before, after = np.abs(d).sum(), np.abs(out).sum()
        if before >= 1e-7 and after >= 1e-7:
            out = out * (before / after)
    return out.reshape(delta.shape)


def np_topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Exactly k largest |x|, ties by lowest flat index (full stable sort)."""
    a = np.abs(x.astype(np.float64).reshape(-1))
    order = np.lexsort((np.arange(a.size), -a))
    mask = np.zeros(a.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def np_keep_count(density: float, n: int) -> int:
    from decimal import Decimal
    import math

    if density >= 1:
        return n
    return min(n, max(1, math.floor(Decimal(str(density)) * n)))


def np_ties(
    taus: list[np.ndarray],
    weights: list[float] | None = None,
    *,
    density: float = 1.0,
    zero_sign: str = "positive",
    normalize: bool = True,
    scale: float = 1.0,
) -> np.ndarray:
    """TIES in float64: trim (exact top-k) → weight → elect by mass → disjoint (weighted) mean."""
    weights = weights or [1.0] * len(taus)
    t = np.stack([x.astype(np.float64) for x in taus])
    for i in range(len(t)):
        t[i] = np.where(np_topk_mask(t[i], np_keep_count(density, t[i].size)), t[i], 0.0)
    w = np.array(weights, dtype=np.float64).reshape((-1,) + (1,) * (t.ndim - 1))
    t = t * w
    mass = t.sum(0)
    elected = np.where(mass > 0, 1.0, np.where(mass < 0, -1.0, 0.0))
    if zero_sign == "majority":
        maj = np.sign(elected.sum()) or 1.0
        elected[elected == 0] = maj
    else:
        elected[elected == 0] = 1.0
    agree = np.sign(t) == elected
    merged = (t * agree).sum(0)
    if normalize:
        div = (w * agree).sum(0)
        merged = merged / np.where(div == 0, 1.0, div)
    return merged * scale
