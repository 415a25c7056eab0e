"""One pass for the linear family on bfloat16: θ_out = bf16(base + Σ_i w_i·(c_i1·…·c_ik·(θ_i − base)) / W).

ExPO, `scale`, task arithmetic, `sum`, `mean` and normalised `linear` are all this formula. The
general path runs it as ten torch kernels per block (two bf16→fp32 conversions, sub, two norms,
mul, add, fp32→bf16, a finiteness check), each a trip through memory; on a 7B merge those are
half the CPU time, on a machine whose two cores also hash and move 40 GB. Here each element is
read once as bf16 bits, computed in float32 with exactly the general path's operations in its
order (one rounding each: sub, every factor, the weight, the running sum, the divisor, the add),
rounded to bf16 to nearest-even as torch does, and written once; the norms the run records are
gathered on the way in float32 lanes moved into float64 every 4096 elements (relative error ~1e-7).

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

@functools.cache
def _kernels():
    try:
        # numba is loaded only when a run has a tensor this path computes (its import costs ~0.5 s)
        from weightx.kernels import bf16_jit
    except ImportError:
        return None
    return bf16_jit.run_single, bf16_jit.run_delta, bf16_jit.run_finish


# Loading numba and its cached machine code costs ~0.4 s a process (~4 s the first time ever, to
# compile); the kernel saves ~1.5 ms of CPU per million elements: below this many edited elements
# in a run the general path is faster.
AUTO_MIN_ELEMENTS = 300_000_000


def wanted(elements: int) -> bool:
    """Whether a run editing this many elements should take the fused path where it can:
    WEIGHTX_FUSED=1 always, 0 never (the switch tests and benchmarks use to compare the two paths),
    unset: from AUTO_MIN_ELEMENTS up. Imports nothing: numba is loaded (`available()`) only for a
    tensor that qualifies, so a TIES or DARE run never pays its ~20 MB and ~0.4 s."""
    mode = os.environ.get("WEIGHTX_FUSED", "").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False
    return mode in ("1", "true", "yes", "on") or elements >= AUTO_MIN_ELEMENTS


def available() -> bool:
    """Whether numba can be imported here (the kernels compiled or loaded from its cache)."""
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
