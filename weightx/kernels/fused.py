"""One pass for the linear family on bfloat16: θ_out = bf16(base + Σ_i w_i·(c_i1·…·c_ik·(θ_i − base)) / W).

ExPO, `scale`, task arithmetic, `sum`, `mean` and normalised `linear` are all this formula. The
general path runs it as ten torch kernels per block (two bf16→fp32 conversions, sub, two norms,
mul, add, fp32→bf16, a finiteness check), each a trip through memory; on a 7B merge those are
half the CPU time, on a machine whose two cores also hash and move 40 GB. Here each element is
read once as bf16 bits, computed in float32 with exactly the general path's operations in its
order (one rounding each: sub, every factor, the weight, the running sum, the divisor, the add),
rounded to bf16 to nearest-even as torch does, and written once; the norms the run records are
gathered on the way in float64 lanes.

Byte-identical to the general path for every finite output by construction (IEEE float32 has one
answer per operation; LLVM does not contract a·b + c into an FMA without fast-math, which is off).
A block with any NaN/Inf or overflowing output is reported and left to the general path, which
owns the NaN bit patterns and the error message. Needs numba (a declared dependency); without it,
or for other dtypes, `available()` is False and the caller keeps the general path.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

LANES = 16  # independent accumulators per norm: lets LLVM vectorise the sums without reassociating them
CHUNK = 4096  # elements whose float32 lane sums are then added into float64 (relative error ~1e-7)


@functools.cache
def _kernels():
    try:
        import numba  # a JIT compiler: loaded only when a run has a tensor this path computes
    except ImportError:
        return None
    u32, f32 = np.uint32, np.float32
    jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    inline = numba.njit(inline="always", boundscheck=False, error_model="numpy")

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

    return run_single, run_delta, run_finish


def available() -> bool:
    """Whether runs may take the fused path: numba importable and WEIGHTX_FUSED not 0 (the switch the
    tests and benchmarks use to compare against the general path)."""
    if os.environ.get("WEIGHTX_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _kernels() is not None


MAX_FACTORS = 2  # per delta (ExPO and a scale); longer chains keep the general path


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy().view(np.uint16)


def _f32(x: float) -> np.float32:
    return np.float32(x)  # what torch does with a Python scalar against a float32 tensor


def linear_bf16(base: torch.Tensor, models: list[torch.Tensor], factors: list[list[float]], weights: list[float],
                divisor: float | None) -> tuple[torch.Tensor, list[float], list[float], float] | None:
    """bf16 output block and the squared norms (per delta before and after its factors, and of the
    combined delta), or None when an output is not finite (then the caller computes the block the
    general way). Inputs are flat contiguous bf16 CPU tensors of one length, possibly read-only views
    of mapped files; each delta's factors (at most MAX_FACTORS) apply in order, then its weight, as
    the general path does. Multiplying by a padding 1.0 is exact for every finite value."""
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("the fused kernel needs numba; check available() first")
    if any(len(f) > MAX_FACTORS for f in factors):
        raise ValueError(f"at most {MAX_FACTORS} factors per delta")
    single, add_delta, finish = kernels
    m = len(models)
    fs = [[_f32(x) for x in list(f) + [1.0] * (MAX_FACTORS - len(f))] for f in factors]
    div = _f32(1.0 if divisor is None else divisor)
    out = torch.empty(base.numel(), dtype=torch.bfloat16)
    # Rows: per delta its squared norm before and after its factors, then the combined delta's, then
    # Σ x² of the float32 outputs: finite only if no output is NaN/Inf or near bf16's overflow.
    acc = np.zeros(2 * m + 2, dtype=np.float64)
    b = _bits(base)
    if m == 1:
        single(b, _bits(models[0]), fs[0][0], fs[0][1], _f32(weights[0]), div, _bits(out), acc)
    else:
        c = np.empty(base.numel(), dtype=np.float32)
        for i in range(m):
            add_delta(b, _bits(models[i]), fs[i][0], fs[i][1], _f32(weights[i]), i == 0, c, acc, 2 * i)
        finish(b, c, div, _bits(out), acc, 2 * m)
    if not np.isfinite(acc[-1]):
        return None
    return out, [float(acc[2 * i]) for i in range(m)], [float(acc[2 * i + 1]) for i in range(m)], float(acc[2 * m])
