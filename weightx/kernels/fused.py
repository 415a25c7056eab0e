"""One pass for the linear family on bfloat16: θ_out = bf16(base + Σ_i w_i·(c_i1·…·c_ik·(θ_i − base)) / W).

ExPO, `scale`, task arithmetic, `sum`, `mean` and normalised `linear` are all this formula; DARE
(k = 0, an elementwise rescale) is one more step per delta, a drop mask (`Mask`): the element's
keep bit is drawn in the loop with `kernels.rng`'s hash of its index in the tensor (the same words:
the general path spends ~5 ns an element on it in numpy, here ~0.7) and ANDed with the float32
bits at the mask's place among the factors, so a dropped entry is +0.0 as `dare_` makes it. The
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
from dataclasses import dataclass

import numpy as np
import torch

from weightx.kernels import rng


@functools.cache
def _kernels():
    try:
        # numba is loaded only when a run has a tensor this path computes (its import costs ~0.5 s)
        from weightx.kernels import bf16_jit
    except ImportError:
        return None
    return (bf16_jit.run_single, bf16_jit.run_delta, bf16_jit.run_finish,
            bf16_jit.run_single_masked, bf16_jit.run_delta_masked)


# Loading numba and its cached machine code costs ~0.4 s a process (~4 s the first time ever, to
# compile); the kernel saves ~1.5 ms of CPU per million elements: below this many edited elements
# in a run the general path is faster.
AUTO_MIN_ELEMENTS = 300_000_000


def wanted(elements: int) -> bool:
    """Whether a run editing this many elements should take the fused path where it can:
    WEIGHTX_FUSED=1 always, 0 never (the switch tests and benchmarks use to compare the two paths),
    unset: from AUTO_MIN_ELEMENTS up. Imports nothing: numba is loaded (`available()`) only for a
    tensor that qualifies, so a TIES run never pays its ~20 MB and ~0.4 s."""
    mode = os.environ.get("WEIGHTX_FUSED", "").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False
    return mode in ("1", "true", "yes", "on") or elements >= AUTO_MIN_ELEMENTS


def available() -> bool:
    """Whether numba can be imported here (the kernels compiled or loaded from its cache)."""
    return _kernels() is not None


MAX_FACTORS = 2  # per delta (ExPO and a scale); longer chains keep the general path


@dataclass(frozen=True)
class Mask:
    """DARE's drop (`weightx.edits.dare.dare_` with k = 0) as one of a delta's steps: entry i of the
    keyed tensor becomes +0.0 where `rng.keep_words(key, …, drop)` drops it. `position`: how many of
    the delta's factors apply before it (its own survivors' factor, when not 1, is the next one)."""

    key: int
    drop: float
    position: int


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy().view(np.uint16)


def _f32(x: float) -> np.float32:
    return np.float32(x)  # what torch does with a Python scalar against a float32 tensor


def _pieces(offset: int, n: int) -> list[tuple[int, int]]:
    """(start, count) of the block's pieces that share their indices' high 32-bit word (the mask's
    round keys depend on it, `rng.key_words`): one piece unless a tensor passes 2³² elements here."""
    out, pos = [], 0
    while pos < n:
        c = min(n - pos, (1 << 32) - ((offset + pos) & rng.M32))
        out.append((pos, c))
        pos += c
    return out


def linear_bf16(base: torch.Tensor, models: list[torch.Tensor], factors: list[list[float]], weights: list[float],
                divisor: float | None, masks: list[Mask | None] | None = None,
                offset: int = 0) -> tuple[torch.Tensor, list[float], list[float], float] | None:
    """bf16 output block and the squared norms (per delta before and after its steps, and of the
    combined delta), or None when an output is not finite (then the caller computes the block the
    general way). Inputs are flat contiguous bf16 CPU tensors of one length, possibly read-only views
    of mapped files; each delta's factors (at most MAX_FACTORS) apply in order, with its drop mask
    (if any) before factor `position`, then its weight, as the general path does. Multiplying by a
    padding 1.0 is exact for every finite value. `offset`: the block's first element in its tensor
    (the masks are drawn per element of the tensor)."""
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("the fused kernel needs numba; check available() first")
    if any(len(f) > MAX_FACTORS for f in factors):
        raise ValueError(f"at most {MAX_FACTORS} factors per delta")
    masks = masks if masks is not None else [None] * len(models)
    single, add_delta, finish, single_masked, add_delta_masked = kernels
    m = len(models)
    fs = [[_f32(x) for x in list(f) + [1.0] * (MAX_FACTORS - len(f))] for f in factors]
    div = _f32(1.0 if divisor is None else divisor)
    n = base.numel()
    out = torch.empty(n, dtype=torch.bfloat16)
    # Rows: per delta its squared norm before and after its steps, then the combined delta's, then
    # Σ x² of the float32 outputs: finite only if no output is NaN/Inf or near bf16's overflow.
    acc = np.zeros(2 * m + 2, dtype=np.float64)
    b, o = _bits(base), _bits(out)
    xs = [_bits(x) for x in models]

    def masked(i: int, s: int) -> tuple:  # the masked kernels' mask arguments for piece s of delta i
        mask = masks[i]
        k0, k1 = rng.key_words(mask.key, (offset + s) >> 32)
        at = [np.uint32(0 if p == mask.position else rng.M32) for p in range(MAX_FACTORS + 1)]
        return (np.uint32((offset + s) & rng.M32), np.uint32(k0), np.uint32(k1), np.uint32(rng.keep_threshold(mask.drop)), *at)

    pieces = _pieces(offset, n)
    if m == 1 and masks[0] is None:
        single(b, xs[0], fs[0][0], fs[0][1], _f32(weights[0]), div, o, acc)
    elif m == 1:
        for s, c in pieces:
            single_masked(b[s:s + c], xs[0][s:s + c], *masked(0, s), fs[0][0], fs[0][1], _f32(weights[0]), div,
                          o[s:s + c], acc)
    else:
        cs = np.empty(n, dtype=np.float32)
        for i in range(m):
            if masks[i] is None:
                add_delta(b, xs[i], fs[i][0], fs[i][1], _f32(weights[i]), i == 0, cs, acc, 2 * i)
                continue
            for s, c in pieces:
                add_delta_masked(b[s:s + c], xs[i][s:s + c], *masked(i, s), fs[i][0], fs[i][1], _f32(weights[i]),
                                 i == 0, cs[s:s + c], acc, 2 * i)
        finish(b, cs, div, o, acc, 2 * m)
    if not np.isfinite(acc[-1]):
        return None
    return out, [float(acc[2 * i]) for i in range(m)], [float(acc[2 * i + 1]) for i in range(m)], float(acc[2 * m])
