"""Exact top-k by magnitude without sorting: a two-pass radix select on float32 bit patterns.

For non-negative IEEE floats the bit pattern, read as an integer, orders like the value, so
|x| ↦ bits(x) & 0x7FFFFFFF turns "the k largest magnitudes" into an integer selection:
1. histogram the high 15 bits (32 768 buckets) and find the bucket holding the k-th largest;
2. histogram the low 16 bits of that bucket's members only, which gives the exact threshold;
3. keep everything above the threshold, and as many entries equal to it as are still needed,
   lowest flat index first (the index list is only built when some ties must be left out).
Cost is a few linear passes, one int32 temporary and a bool mask, instead of the O(n log n)
argsort mergekit uses (its TIES spends most of its time there). Every step is integer arithmetic,
so the selected set is the same on every device and run.

Conventions: the count is ⌊density·n⌋ computed from the decimal the user wrote (0.29 of 100 is
29; float `int(0.29*100)` would give 28) and at least 1 for a non-empty tensor with density > 0,
as mergekit does. Ties at the threshold are broken by flat (row-major) index, lowest first. −0.0
counts as 0. NaN counts as larger than any number (a NaN delta means a broken input anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

_ABS = 0x7FFFFFFF
T = TypeVar("T")
MEMBER_BYTES = 16 << 20  # see select_blocks


def keep_count(density: float, n: int) -> int:
    """How many of n entries a top-`density` selection keeps."""
    if n <= 0 or density <= 0:
        return 0
    if density >= 1:
        return n
    # str() is the shortest decimal that round-trips: the number the user typed.
    return min(n, max(1, math.floor(Fraction(str(density)) * n)))


def kth_bucket(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Largest bucket b with #(entries in buckets ≥ b) ≥ k, and #(entries in buckets > b)."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # non-increasing in b
    b = int((at_or_above >= k).sum()) - 1
    above = int(at_or_above[b + 1]) if b + 1 < counts.numel() else 0
    return b, above


# Compares to bool and boolean gathers are 2-10x slower in torch's CPU kernels than in numpy's
# (1M entries: eq 0.4-0.7 vs 0.07 ns each, mask gather 0.9 vs 0.4); both give the same integers.
# CUDA tensors stay in torch.
NUMPY_ON_CPU = True


def _bucket_low_bits(bits: torch.Tensor, b: int, hi: torch.Tensor | None = None) -> torch.Tensor:
    """Low 16 bits of the entries of flat int32 `bits` whose magnitude's high 15 bits equal b."""
    if bits.device.type == "cpu" and NUMPY_ON_CPU:
        a = bits.numpy()
        high = hi.numpy() if hi is not None else (a >> 16) & (_ABS >> 16)
        return torch.from_numpy(a[high == b] & 0xFFFF)
    if hi is None:
        hi = torch.bitwise_right_shift(bits, 16).bitwise_and_(_ABS >> 16)
    return bits[hi == b].bitwise_and_(0xFFFF)


def _count_equal(x: torch.Tensor, v: int) -> int:
    if x.device.type == "cpu" and NUMPY_ON_CPU:
        return int(np.count_nonzero(x.numpy() == v))
    return int(torch.count_nonzero(torch.eq(x, v)))


def _first_equal(x: torch.Tensor, v: int, r: int) -> torch.Tensor:
    """Flat positions of the first r entries of flat `x` equal to v."""
    if x.device.type == "cpu" and NUMPY_ON_CPU:
        return torch.from_numpy(np.flatnonzero(x.numpy() == v)[:r])
    return torch.nonzero(x == v).view(-1)[:r]


class Workspace:
    """A reusable int32 buffer for selections over tensors of up to `n` elements.

    Fresh multi-hundred-MB temporaries cost page faults on every use; TIES trims several deltas of
    the same shape and reuses one workspace for all of them (and for its own sign arithmetic)."""

    def __init__(self, n: int, device: torch.device):
        self.ints = torch.empty(n, dtype=torch.int32, device=device)

    @classmethod
    def for_tensor(cls, x: torch.Tensor, ws: "Workspace | None") -> "Workspace":
        if ws is not None and ws.ints.numel() >= x.numel() and ws.ints.device == x.device:
            return ws
        return cls(x.numel(), x.device)


def threshold_bits(x: torch.Tensor, k: int, ws: Workspace | None = None) -> tuple[int, int, int]:
    """(v, r, e): the k-th largest |x| as float32 bits v, how many entries equal to it to keep (r),
    and how many there are (e). x is float32 and contiguous; 1 ≤ k ≤ numel."""
    ws = Workspace.for_tensor(x, ws)
    n = x.numel()
    bits = x.reshape(-1).view(torch.int32)
    hi = torch.bitwise_right_shift(bits, 16, out=ws.ints[:n]).bitwise_and_(_ABS >> 16)  # 15 bits, no sign
    b, above = kth_bucket(torch.bincount(hi, minlength=1 << 15), k)
    counts = torch.bincount(_bucket_low_bits(bits, b, hi), minlength=1 << 16)
    lo, above_lo = kth_bucket(counts, k - above)
    return (b << 16) | lo, k - above - above_lo, int(counts[lo])


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of x) selecting exactly k entries of largest |x|; ties by lowest flat index."""
    if k >= x.numel():
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    x = x.contiguous()
    v, r, e = threshold_bits(x, k)
    mags = x.reshape(-1).view(torch.int32).bitwise_and(_ABS)
    if r == e:
        return (mags >= v).view(x.shape)  # every tie at the threshold is kept
    keep = mags > v
    keep[_first_equal(mags, v, r)] = True
    return keep.view(x.shape)


def trim_(x: torch.Tensor, density: float, ws: Workspace | None = None) -> torch.Tensor:
    """Zero all but the top-`density` fraction of |x| in place (exact count, see module doc).

    Equal in value to `x * topk_mask(x, k)`. Works on the float bits with int32 ops only (bool →
    float conversions and masked_fill_ are several times slower on CPU for big tensors).
    """
    return trim_count_(x, keep_count(density, x.numel()), ws)


def trim_count_(x: torch.Tensor, k: int, ws: Workspace | None = None) -> torch.Tensor:
    """`trim_` keeping exactly k entries (0 ≤ k)."""
    if k >= x.numel():
        return x
    if k == 0:
        return x.zero_()
    if not x.is_contiguous():
        return x.copy_(trim_count_(x.contiguous(), k, ws))
    ws = Workspace.for_tensor(x, ws)
    n = x.numel()
    v, r, e = threshold_bits(x, k, ws)
    bits = x.view(-1).view(torch.int32)
    mags = torch.bitwise_and(bits, _ABS, out=ws.ints[:n])
    # Keep |x| > thr; with every tie at v kept, thr = v − 1 (≥ −1). Zeros need no tie-break:
    # keeping a zero changes no value.
    partial = r < e and v != 0
    thr = v if r < e else v - 1
    if partial:
        ties = _first_equal(mags, v, r)
        saved = bits[ties]
    # thr − mags < 0 ⇔ keep; it fits int32 (both in [−1, 2³¹)), and >> 31 turns the sign into an
    # all-ones (keep) or all-zeros (drop) word to AND with the float bits.
    mask = mags.neg_().add_(thr).bitwise_right_shift_(31)
    bits.bitwise_and_(mask)
    if partial:
        bits[ties] = saved
    return x


# --- The same selection over a tensor streamed in blocks (no whole-tensor buffer) -------------
#
# Pass 1 accumulates the high-bits histogram over the blocks, pass 2 the low-bits histogram of the
# k-th bucket's members; both are integer counts, so (v, r, e) equal `threshold_bits` on the whole
# tensor. When some ties at v must be dropped, pass 3 counts each block's ties, so a block knows how
# many precede it and keeps the right ones without seeing the others (blocks may then be computed
# in any order, on any thread). Memory: two histograms and one block-sized temporary.


@dataclass
class Selection:
    """The top-k threshold of one streamed tensor of n entries (see `select_blocks`)."""

    n: int
    k: int
    v: int = 0  # float32 bits of the k-th largest |x|
    r: int = 0  # how many entries equal to v are kept …
    e: int = 0  # … of how many
    before: dict[int, int] = field(default_factory=dict)  # block start → ties at v in earlier blocks
    within: dict[int, int] = field(default_factory=dict)  # block start → ties at v in the block

    @property
    def partial(self) -> bool:  # some ties at v (≠ 0) are dropped: the lowest-index r are kept
        return 0 < self.k < self.n and self.r < self.e and self.v != 0


Blocks = Callable[[], Iterable[tuple[int, list[torch.Tensor]]]]


class PooledBlocks:
    """A block source that computes its blocks, and runs a function on them, on a thread pool (the
    engine's); `each_block` hands such a source the work instead of walking the blocks itself."""

    def __call__(self, readonly: bool = False) -> Iterable[tuple[int, list[torch.Tensor]]]:
        raise NotImplementedError

    def imap(self, fn: Callable[[int, list[torch.Tensor]], T], readonly: bool = False) -> Iterator[T]:
        raise NotImplementedError


def each_block(blocks: Blocks, fn: Callable[[int, list[torch.Tensor]], T], readonly: bool = False) -> Iterator[T]:
    """fn(start, xs) for every block, yielded in block order. The engine's block sources compute
    the blocks and run fn on its thread pool (`.imap`); a plain callable is walked in turn. Folds
    over the results in this order are the same whatever ran them. `readonly`: fn promises not to
    modify xs, so the engine may hand over its decoded (cached) blocks without copying them."""
    if isinstance(blocks, PooledBlocks):
        return blocks.imap(fn, readonly)
    return (fn(start, xs) for start, xs in blocks())


def _as_int16(u: int) -> int:
    return u - (1 << 16) if u >= 1 << 15 else u


def _mags(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).view(torch.int32).bitwise_and(_ABS)


def _high_bits(x: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_right_shift(x.reshape(-1).view(torch.int32), 16).bitwise_and_(_ABS >> 16)


def select_blocks(blocks: Blocks, n: int, ks: list[int]) -> list[Selection]:
    """Exact top-k thresholds of several tensors of n entries streamed together.

    `blocks()` yields (start, [x_0 block, x_1 block, …]) in flat order, contiguous float32, and
    is walked once per pass (2, or 3 when ties at the threshold must be split), through
    `each_block`: the engine runs a pass's blocks in parallel; the counts are integers, so the
    result does not depend on it."""
    sels = [Selection(n, min(max(k, 0), n)) for k in ks]
    live = [i for i, s in enumerate(sels) if 0 < s.k < n]
    if not live:
        return sels
    def high(_: int, xs: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        return {i: torch.bincount(_high_bits(xs[i]), minlength=1 << 15).cpu() for i in live}

    hist = {i: torch.zeros(1 << 15, dtype=torch.int64) for i in live}
    for h in each_block(blocks, high, readonly=True):
        for i in live:
            hist[i] += h[i]
    bucket = {i: kth_bucket(hist[i], sels[i].k) for i in live}

    # The k-th bucket's members (low 16 bits) of each block are kept, up to MEMBER_BYTES in all, so
    # the ties at v per block are counted from them instead of in a third pass over the blocks.
    # They are copied, as int16, into one buffer: hundreds of small long-lived arrays interleaved
    # with the block buffers kept glibc from reusing or returning those (+250 MB peak on a 7B TIES).
    store = torch.empty(MEMBER_BYTES // 2, dtype=torch.int16)
    kept: dict[int, dict[int, torch.Tensor | None]] = {i: {} for i in live}
    used = 0

    def low(start: int, xs: list[torch.Tensor]) -> tuple[int, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        hists, members = {}, {}
        for i in live:
            members[i] = _bucket_low_bits(xs[i].reshape(-1).view(torch.int32), bucket[i][0])
            hists[i] = torch.bincount(members[i], minlength=1 << 16).cpu()
        return start, hists, members

    lo_hist = {i: torch.zeros(1 << 16, dtype=torch.int64) for i in live}
    for start, hists, members in each_block(blocks, low, readonly=True):
        for i in live:
            lo_hist[i] += hists[i]
            m = members[i].numel()
            if used + m <= store.numel() and used >= 0:
                kept[i][start] = store[used:used + m].copy_(members[i].cpu().to(torch.int16))
                used += m
            else:
                kept[i][start], used = None, -1  # over the budget: pass 3 counts from the blocks
        del members
    for i in live:
        b, above = bucket[i]
        lo, above_lo = kth_bucket(lo_hist[i], sels[i].k - above)
        s = sels[i]
        s.v, s.r, s.e = (b << 16) | lo, s.k - above - above_lo, int(lo_hist[i][lo])
    split = [i for i in live if sels[i].partial]
    if split:
        if any(m is None for i in split for m in kept[i].values()):  # over the budget: count again

            def ties_at_v(start: int, xs: list[torch.Tensor]) -> tuple[int, dict[int, int]]:
                return start, {i: _count_equal(_mags(xs[i]), sels[i].v) for i in split}

            counted = list(each_block(blocks, ties_at_v, readonly=True))
        else:
            starts = list(kept[split[0]])
            # Stored as int16: the low 16 bits wrap, and so does the value compared.
            counted = [(st, {i: _count_equal(kept[i][st], _as_int16(sels[i].v & 0xFFFF)) for i in split})
                       for st in starts]
        seen = {i: 0 for i in split}
        for start, counts in counted:  # prefix sums in block order
            for i in split:
                sels[i].before[start] = seen[i]
                sels[i].within[start] = counts[i]
                seen[i] += counts[i]
    return sels


def reference_count(density: float, n: int) -> int:
    """The TIES reference's kept count before ties: int(n·density) + 1 (float arithmetic, as its
    `topk_values_mask` computes `d - int(d * K)` for kthvalue); n when that passes the end."""
    if n <= 0 or density <= 0:
        return 0
    return min(n, int(n * density) + 1)


def mergelm_count(density: float, n: int) -> int:
    """MergeLM's magnitude masking keeps what lies strictly above its int(n·(1 − density))-th smallest
    |x|: as a top-k threshold, the (n − int(n·(1 − density)) + 1)-th largest, ties at it dropped."""
    drop = int(n * (1.0 - density))
    return n if drop <= 0 else n - drop + 1


def with_ties(sel: Selection, keep: bool) -> Selection:
    """The selection keeping every entry equal to its threshold (`keep`), or none of them — the
    references' `>= kth` and `> kth` rules instead of an exact count. Integer bits make "> v" the
    same as ">= v + 1"."""
    if sel.k <= 0 or sel.k >= sel.n:
        return sel
    return Selection(sel.n, sel.k, sel.v if keep else sel.v + 1, 0, 0)


def trim_block_(x: torch.Tensor, sel: Selection, start: int) -> torch.Tensor:
    """`trim_` of the whole tensor, restricted to its block x starting at flat index `start`
    (x contiguous, one of the blocks `select_blocks` saw). Same values bit for bit."""
    if sel.k >= sel.n:
        return x
    if sel.k == 0:
        return x.zero_()
    bits = x.view(-1).view(torch.int32)
    mags = bits.bitwise_and(_ABS)
    thr = sel.v if sel.r < sel.e else sel.v - 1
    ties = None
    if sel.partial:
        # Keep the block's ties at v when the boundary of the r kept ones lies past it, drop them
        # when it lies before it; only the block holding the boundary needs their positions.
        need = sel.r - sel.before[start]
        if need >= sel.within[start]:
            thr = sel.v - 1
        elif need > 0:
            ties = _first_equal(mags, sel.v, need)
            saved = bits[ties]
    bits.bitwise_and_(mags.neg_().add_(thr).bitwise_right_shift_(31))
    if ties is not None:
        bits[ties] = saved
    return x
