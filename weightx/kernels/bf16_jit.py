"""The numba kernels behind `weightx.kernels.fused` (imported only when a run uses them: numba's
import and the cached machine code cost ~0.5 s). Module-level functions, so numba's on-disk cache
keeps their compiled code between runs (functions made inside another function are recompiled, ~2 s).
"""

from __future__ import annotations

import numba
import numpy as np

from weightx.kernels import rng

LANES = 16  # independent accumulators per norm: lets LLVM vectorise the sums without reassociating them
CHUNK = 4096  # elements whose float32 lane sums are then added into float64 (relative error ~1e-7)

u32, f32 = np.uint32, np.float32
jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
inline = numba.njit(inline="always", cache=True, boundscheck=False, error_model="numpy")


@inline
def widen(h):  # bf16 bits → float32, exact
    return u32(u32(h) << u32(16)).view(f32)


@inline
def narrow(x):  # float32 → bf16 bits, to nearest-even as torch rounds finite values
    bits = f32(x).view(u32)
    return np.uint16(u32(u32(bits + u32(0x7FFF) + u32(u32(bits >> u32(16)) & u32(1))) >> u32(16)))


@inline
def edited(b, h, f1, f2, w, acc, row, j):  # w·((θ − base)·f1·f2), one rounding each, norms on the way
    d = widen(h) - b
    acc[row, j] += d * d
    d = d * f1
    d = d * f2
    acc[row + 1, j] += d * d
    return d * w


# lowbias32 (`weightx.kernels.rng`) on uint32 words: the casts keep numba's arithmetic in 32 bits.
C1, C2 = (u32(c) for c in rng.MULTIPLIERS)
DROP_SHIFT = u32(32 - rng.UNIFORM_BITS)  # the hash's top bits are compared with `rng.keep_threshold`
ALL = u32(0xFFFFFFFF)


@inline
def mix(x):
    x = u32(x ^ u32(x >> u32(16)))
    x = u32(x * C1)
    x = u32(x ^ u32(x >> u32(15)))
    x = u32(x * C2)
    return u32(x ^ u32(x >> u32(16)))


@inline
def keep_word(lo, k0, k1, t24):  # one word of `rng.keep_words`: all ones where kept, 0 where dropped
    h = mix(u32(mix(u32(lo ^ k0)) ^ k1))
    return ALL if u32(h >> DROP_SHIFT) >= t24 else u32(0)


@inline
def clear(d, m):  # float32 bits AND m: a dropped entry becomes +0.0, as `dare_` makes it
    return u32(f32(d).view(u32) & m).view(f32)


@inline
def edited_masked(b, h, word, at0, at1, at2, f1, f2, w, acc, row, j):
    # As `edited`, with the drop mask at one of three places (at_p is 0 there, all ones elsewhere).
    d = widen(h) - b
    acc[row, j] += d * d
    d = clear(d, word | at0) * f1
    d = clear(d, word | at1) * f2
    d = clear(d, word | at2)
    acc[row + 1, j] += d * d
    return d * w


@inline
def output(b, c, divisor, out, i, acc, row, j):  # base + c (÷ divisor), rounded; its square checks finiteness
    if divisor != f32(1.0):
        c = c / divisor
    acc[row, j] += c * c
    x = b + c
    acc[row + 1, j] += x * x
    out[i] = narrow(x)


# Each kernel walks `lo` to `hi` in groups of LANES (element j of a group adds into lane j); its
# _tail twin takes the last < LANES elements on lanes 0, 1, …: a remainder loop (or a variable
# group size) in the same function stops LLVM from vectorising the main one (7x slower).
@jit
def single(base, model, f1, f2, w, divisor, out, acc):  # pragma: no cover - compiled
    for k in range(0, base.size, LANES):
        for j in range(LANES):
            b = widen(base[k + j])
            output(b, edited(b, model[k + j], f1, f2, w, acc, 0, j), divisor, out, k + j, acc, 2, j)


@jit
def single_tail(base, model, f1, f2, w, divisor, out, acc):  # pragma: no cover - compiled
    for k in range(base.size):
        b = widen(base[k])
        output(b, edited(b, model[k], f1, f2, w, acc, 0, k), divisor, out, k, acc, 2, k)


@jit
def single_masked(base, model, lo, k0, k1, t24, at0, at1, at2, f1, f2, w, divisor, out, acc):  # pragma: no cover - compiled
    for k in range(0, base.size, LANES):
        for j in range(LANES):
            b = widen(base[k + j])
            word = keep_word(u32(lo + u32(k + j)), k0, k1, t24)
            d = edited_masked(b, model[k + j], word, at0, at1, at2, f1, f2, w, acc, 0, j)
            output(b, d, divisor, out, k + j, acc, 2, j)


@jit
def single_masked_tail(base, model, lo, k0, k1, t24, at0, at1, at2, f1, f2, w, divisor, out, acc):  # pragma: no cover - compiled
    for k in range(base.size):
        b = widen(base[k])
        word = keep_word(u32(lo + u32(k)), k0, k1, t24)
        output(b, edited_masked(b, model[k], word, at0, at1, at2, f1, f2, w, acc, 0, k), divisor, out, k, acc, 2, k)


@jit
def add_delta_masked(base, model, lo, k0, k1, t24, at0, at1, at2, f1, f2, w, first, c, acc):  # pragma: no cover - compiled
    for k in range(0, base.size, LANES):
        for j in range(LANES):
            word = keep_word(u32(lo + u32(k + j)), k0, k1, t24)
            d = edited_masked(widen(base[k + j]), model[k + j], word, at0, at1, at2, f1, f2, w, acc, 0, j)
            c[k + j] = d if first else c[k + j] + d


@jit
def add_delta_masked_tail(base, model, lo, k0, k1, t24, at0, at1, at2, f1, f2, w, first, c, acc):  # pragma: no cover - compiled
    for k in range(base.size):
        word = keep_word(u32(lo + u32(k)), k0, k1, t24)
        d = edited_masked(widen(base[k]), model[k], word, at0, at1, at2, f1, f2, w, acc, 0, k)
        c[k] = d if first else c[k] + d


@jit
def add_delta(base, model, f1, f2, w, first, c, acc):  # pragma: no cover - compiled
    for k in range(0, base.size, LANES):
        for j in range(LANES):
            d = edited(widen(base[k + j]), model[k + j], f1, f2, w, acc, 0, j)
            c[k + j] = d if first else c[k + j] + d  # as `weighted_sum`


@jit
def add_delta_tail(base, model, f1, f2, w, first, c, acc):  # pragma: no cover - compiled
    for k in range(base.size):
        d = edited(widen(base[k]), model[k], f1, f2, w, acc, 0, k)
        c[k] = d if first else c[k] + d


@jit
def finish(base, c, divisor, out, acc):  # pragma: no cover - compiled
    for k in range(0, base.size, LANES):
        for j in range(LANES):
            output(widen(base[k + j]), c[k + j], divisor, out, k + j, acc, 0, j)


@jit
def finish_tail(base, c, divisor, out, acc):  # pragma: no cover - compiled
    for k in range(base.size):
        output(widen(base[k]), c[k], divisor, out, k, acc, 0, k)


@inline
def flush(lanes, acc, row):
    for r in range(lanes.shape[0]):
        for j in range(LANES):
            acc[row + r] += lanes[r, j]
            lanes[r, j] = 0.0


# The drivers run a kernel CHUNK elements at a time and move its float32 lane sums into
# float64 after each chunk.
@jit
def run_single(base, model, f1, f2, w, divisor, out, acc):  # pragma: no cover - compiled
    lanes = np.zeros((4, LANES), dtype=np.float32)
    n = base.size
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        mid = e - (e - s) % LANES
        single(base[s:mid], model[s:mid], f1, f2, w, divisor, out[s:mid], lanes)
        single_tail(base[mid:e], model[mid:e], f1, f2, w, divisor, out[mid:e], lanes)
        flush(lanes, acc, 0)


@jit
def run_delta(base, model, f1, f2, w, first, c, acc, row):  # pragma: no cover - compiled
    lanes = np.zeros((2, LANES), dtype=np.float32)
    n = base.size
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        mid = e - (e - s) % LANES
        add_delta(base[s:mid], model[s:mid], f1, f2, w, first, c[s:mid], lanes)
        add_delta_tail(base[mid:e], model[mid:e], f1, f2, w, first, c[mid:e], lanes)
        flush(lanes, acc, row)


@jit
def run_finish(base, c, divisor, out, acc, row):  # pragma: no cover - compiled
    lanes = np.zeros((2, LANES), dtype=np.float32)
    n = base.size
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        mid = e - (e - s) % LANES
        finish(base[s:mid], c[s:mid], divisor, out[s:mid], lanes)
        finish_tail(base[mid:e], c[mid:e], divisor, out[mid:e], lanes)
        flush(lanes, acc, row)


@jit
def run_single_masked(base, model, lo, k0, k1, t24, at0, at1, at2, f1, f2, w, divisor, out, acc):  # pragma: no cover - compiled
    lanes = np.zeros((4, LANES), dtype=np.float32)
    n = base.size
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        mid = e - (e - s) % LANES
        single_masked(base[s:mid], model[s:mid], u32(lo + u32(s)), k0, k1, t24, at0, at1, at2, f1, f2, w, divisor,
                      out[s:mid], lanes)
        single_masked_tail(base[mid:e], model[mid:e], u32(lo + u32(mid)), k0, k1, t24, at0, at1, at2, f1, f2, w,
                           divisor, out[mid:e], lanes)
        flush(lanes, acc, 0)


@jit
def run_delta_masked(base, model, lo, k0, k1, t24, at0, at1, at2, f1, f2, w, first, c, acc, row):  # pragma: no cover - compiled
    lanes = np.zeros((2, LANES), dtype=np.float32)
    n = base.size
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        mid = e - (e - s) % LANES
        add_delta_masked(base[s:mid], model[s:mid], u32(lo + u32(s)), k0, k1, t24, at0, at1, at2, f1, f2, w, first,
                         c[s:mid], lanes)
        add_delta_masked_tail(base[mid:e], model[mid:e], u32(lo + u32(mid)), k0, k1, t24, at0, at1, at2, f1, f2, w,
                              first, c[mid:e], lanes)
        flush(lanes, acc, row)
