"""Computing one planned tensor: θ_out = base + combine_i(w_i · edits_i(θ_i − base)).

Inputs are mmap'd views; each output tensor is computed in float32 (in blocks when every step is
elementwise), rounded once to the output dtype, and handed to a writer thread that streams it into
a shard whose header was laid out from the plan. Steps that need a tensor-wide statistic but can
gather it over blocks (`streams`: TIES, magnitude, DARE `l1`) get pre-passes that recompute the
blocks (run on the block pool; decoded once when the tensor fits PASS_CACHE_BYTES, else re-read
from the mappings), then run per block too. Memory is a few blocks plus, for the other
whole-tensor edits (bitdelta, ternary), a few copies of the largest tensor, whatever the model size.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from weightx.combine.base import CombineConfig
from weightx.edits.base import TensorContext
from weightx.errors import InputError, UsageError
from weightx.io.provenance import Pacer
from weightx.io.quantized import dequantize, dequantize_mxfp4
from weightx.io.safetensors import DTYPES, MappedFile, TensorInfo, itemsize
from weightx.io.sources import Source
from weightx.io.stream import DirectStream
from weightx.kernels import fused
from weightx.kernels.topk import PooledBlocks
from weightx.pipeline.plan import Plan, TensorPlan
from weightx.pipeline.state import RunState

BLOCK_ELEMENTS = 1 << 20
# A streamed tensor's float32 deltas are decoded once and kept for its pre-passes and final blocks,
# instead of re-read from the mappings on every pass, for as many leading blocks as fit in this
# many bytes (the rest re-read). A fixed budget, so peak memory does not grow with the model. On
# a 7B-shaped TIES, caching nothing cost ~7 % of the time; whole attention matrices (160 MB) put
# the peak over 400 MB; 64 MB of leading blocks kept the time but peaked at 414-426 MB on a slower
# VM; 32 MB measured 367 MB there in the same time (150 s against 155-171 s). The base is not
# kept: only the final blocks use it, and converting it again costs what copying it would.
PASS_CACHE_BYTES = 32 << 20


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def pick_device(device: str = "auto") -> torch.device:
    """The compute device; anything but auto, cpu, cuda or cuda:N is one line saying so."""
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise UsageError(f"--device {device!r} is not a device weightx computes on; use auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


@dataclass
class TensorStats:
    delta_norm: dict[str, float] = field(default_factory=dict)  # ‖θ_i − base‖ per input alias
    edited_norm: dict[str, float] = field(default_factory=dict)  # after that delta's edits (and before weight)
    combined_norm: float = 0.0  # ‖θ_out − base‖ before rounding
    extra: dict = field(default_factory=dict)  # method-specific per-tensor facts (e.g. compression scale, error)

    def as_dict(self) -> dict:
        return {"delta_norm": self.delta_norm, "edited_norm": self.edited_norm, "combined_norm": self.combined_norm, **self.extra}


class Inputs:
    """Open mappings of every input shard, created on first use, and the streams of the files the
    engine reads front to back (`stream`). `pacer` (the run's input hashes) hears before each
    mapped tensor is read where the reads will end."""

    def __init__(self, pacer: Pacer | None = None) -> None:
        self._maps: dict[Path, MappedFile] = {}
        self._streams: dict[Path, DirectStream] = {}
        self._experts: dict[tuple, torch.Tensor] = {}  # the last MXFP4 experts dequantized
        self._lock = threading.Lock()
        self.pacer = pacer

    def get(self, src: Source, name: str) -> tuple[MappedFile, object]:
        if name in src.mxfp4:  # the bytes read are the blocks'
            shard, info = src.mxfp4[name].blocks
            return self.mapped(src, shard), info
        shard = src.weight_map[name]
        return self.mapped(src, shard), src.headers[shard].tensors[name]

    def _expert(self, src: Source, name: str, e: int, device: torch.device) -> torch.Tensor:
        """Expert e of an MXFP4 weight, dequantized to float32 [in, out] (the last two kept: blocks of
        one expert come in a row)."""
        key = (id(src), name, e, str(device))
        with self._lock:
            hit = self._experts.get(key)
        if hit is not None:
            return hit
        q = src.mxfp4[name]
        (bshard, binfo), (sshard, sinfo) = q.blocks, q.scales
        _, r, g, b = binfo.shape
        blocks = self.mapped(src, bshard).view(binfo, e * r * g * b, r * g * b).to(device).view(r, g, b)
        scales = self.mapped(src, sshard).view(sinfo, e * r * g, r * g).to(device).view(r, g)
        w = dequantize_mxfp4(blocks, scales).contiguous()
        with self._lock:
            self._experts[key] = w
            while len(self._experts) > 2:
                self._experts.pop(next(iter(self._experts)))
        return w

    def mapped(self, src: Source, shard: str) -> MappedFile:
        header = src.headers[shard]
        mf = self._maps.get(header.path)
        if mf is None:
            mf = self._maps[header.path] = MappedFile(header)
        return mf

    def stream(self, pieces: dict[Path, list[tuple[tuple[str, int], int, int]]], buffers: int) -> None:
        """Read these blocks ((tensor, start), file bytes [lo, hi), in the order `block` will ask
        for them) with `io.stream` instead of through the mappings; each file's stream feeds the
        file's hash when the pacer has one to feed."""
        for path, todo in pieces.items():
            run = self.pacer.claim(path) if self.pacer is not None else None
            self._streams[path] = DirectStream(path, todo, buffers, run.feed if run is not None else None,
                                               (lambda p=path: self.pacer.unclaim(p)) if run is not None else None)

    def block(self, src: Source, name: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start+count) of an input tensor as stored, flat: from its file's stream
        when the block was planned there (`done` gives it back), else a view of the mapping."""
        mf, info = self.get(src, name)
        st = self._streams.get(mf.header.path)
        if st is not None and (name, start) in st:
            return st.view((name, start), DTYPES[info.dtype], count)
        return mf.view(info, start, count)

    def feed(self, src: Source, name: str, start: int) -> None:
        """Feed a streamed block to its file's hash once it is read (`DirectStream.feed`)."""
        st = self._streams.get(self.get(src, name)[0].header.path)
        if st is not None and (name, start) in st:
            st.feed((name, start))

    def done(self, src: Source, name: str, start: int) -> None:
        """The compute is done with a block `block` took from a stream."""
        st = self._streams.get(self.get(src, name)[0].header.path)
        if st is not None and (name, start) in st:
            st.release((name, start))

    def read(self, src: Source, name: str, start: int, count: int, device: torch.device,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, start+count) of tensor `name` of `src` as float32 on `device`: a fresh
        tensor, or `out` filled. FP8 block-scaled and MXFP4 weights come dequantized."""
        if name in src.mxfp4:
            _, inner, outer = src.mxfp4[name].info.shape
            per, pos, pieces = inner * outer, start, []
            while pos < start + count:
                e = pos // per
                hi = min(per, start + count - e * per)
                pieces.append(self._expert(src, name, e, device).reshape(-1)[pos - e * per:hi])
                pos = e * per + hi
            x = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float32, device=device)
            return out.copy_(x) if out is not None else x.clone()
        mf, info = self.get(src, name)
        x = mf.view(info, start, count)
        if device.type != "cpu":
            x = x.to(device, non_blocking=False)
        if name in src.fp8:
            shard, sinfo = src.fp8[name]
            scales = self.mapped(src, shard).view(sinfo, 0, sinfo.numel).to(device=device, dtype=torch.float32).view(sinfo.shape)
            x = dequantize(x.to(torch.float32), start, info.shape, scales, src.fp8_block)
            return x if out is None else out.copy_(x)
        if out is not None:
            return out.copy_(x)
        # copy=True: a float32 input must never be modified in place through its mapping.
        return x.to(torch.float32, copy=True)

    def close(self) -> None:
        for st in self._streams.values():
            st.close()
        self._streams.clear()
        for mf in self._maps.values():
            mf.close()
        self._maps.clear()


_COUNT_LOCK = threading.Lock()  # blocks of one tensor may be computed on several threads


class NonFiniteWarning(UserWarning):
    """A NaN/Inf was written because the recipe says `output.on_nonfinite: warn`."""


def _first_bad(x: torch.Tensor) -> tuple[int, int, float] | None:
    """(count, first flat index, first value) of the non-finite entries of x, or None."""
    bad = ~torch.isfinite(x.reshape(-1))
    n = int(bad.sum())
    if not n:
        return None
    i = int(torch.nonzero(bad)[0])
    return n, i, float(x.reshape(-1)[i])


# The smallest float32 magnitude that rounds to Inf in bfloat16 (0x7F7F8000): a finite float32
# above it is written as Inf.
BF16_OVERFLOW = 3.39617752923046e38


def _finite_after_rounding(x: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> bool:
    """One reduction per block (~30x cheaper than isfinite().all() on CPU), on what is written: no
    NaN/Inf in x, and none made by rounding to the output dtype. bf16: min and max of x against the
    overflow bound (a float32 sum of bf16 values costs 5x more); fp16: the sum of the rounded block,
    whose overflow is then confirmed or cleared by `nonfinite`; float32: the sum of x."""
    if dtype == torch.bfloat16:
        lo, hi = torch.aminmax(x)
        return bool(hi < BF16_OVERFLOW) and bool(lo > -BF16_OVERFLOW)  # NaN compares False
    if dtype == torch.float16:
        return bool(torch.isfinite(out.sum(dtype=torch.float32)))
    return bool(torch.isfinite(x.sum()))


def _sq(x: torch.Tensor) -> float:
    flat = x.reshape(-1)
    return float(torch.dot(flat, flat)) if flat.numel() else 0.0


class TensorComputer:
    """Computes one planned tensor as a sequence of output blocks (flat, in the output dtype)."""

    def __init__(self, plan: Plan, inputs: Inputs, device: torch.device, block: int = BLOCK_ELEMENTS,
                 pool: ThreadPoolExecutor | None = None, workers: int = 1, run: RunState | None = None):
        self.plan = plan
        self.run = run if run is not None else RunState()  # what the run's pre-passes learned
        self.pool = pool  # the engine's block pool: pre-passes run their blocks on it
        self.workers = workers
        # Per cached streamed tensor (see PASS_CACHE_BYTES): block start → [θ_i − base].
        self._cache: dict[str, dict[int, list[torch.Tensor]]] = {}
        self._arena: torch.Tensor | None = None  # the cache's storage, reused tensor after tensor
        # Per delta: its own base when it is not the recipe's (a transplant), else None.
        self._own_base = [b if b is not plan.base else None for b in plan.delta_bases]
        self.inputs = inputs
        self.device = device
        self.block = block
        self.aliases = [d.model for d in plan.recipe.deltas]
        self.weights = [d.weight for d in plan.recipe.deltas]
        # Per streamed tensor: what each non-elementwise step's `prepare` gathered, keyed by
        # (delta index, edit index) or "combine"; dropped when the tensor is finished.
        self._states: dict[str, dict] = {}
        self._state_lock = threading.Lock()
        self._fused: dict[str, Fused | None] = {}  # per tensor, decided on its first block
        self._fuse = device.type == "cpu" and fused.wanted(sum(t.numel for t in plan.tensors if t.edit))
        self._streamed: set[str] = set()  # tensors read from `Inputs.stream` (`stream_pieces`)

    def load(self, src: Source, t: TensorPlan, start: int, count: int,
             out: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        """Block [start, start+count) of input `src` as float32: a fresh tensor, or `out` filled.
        `base`: the base's block when the caller has it (rows aligned by token fill a delta's missing rows from it)."""
        if t.rows is not None:  # rows aligned by token (`weightx.pipeline.vocab`)
            x = self._aligned(src, t, start, count, base)
            return x if out is None else out.copy_(x)
        return self.inputs.read(src, t.name, start, count, self.device, out)

    def _rows(self, src: Source, t: TensorPlan, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, present) of output elements [start, start+count) gathered from src's rows of the same token."""
        cols = t.shape[1]
        idx = torch.arange(start, start + count)
        row = t.rows[src.alias][idx // cols]
        present = row >= 0
        mf, info = self.inputs.get(src, t.name)
        flat = mf.view(info, 0, info.numel)
        values = flat[row.clamp(min=0) * cols + idx % cols].to(torch.float32)
        return values.to(self.device), present.to(self.device)

    def _aligned(self, src: Source, t: TensorPlan, start: int, count: int, base: torch.Tensor | None = None) -> torch.Tensor:
        """An input's block on the output's rows: the base's rows of tokens it lacks are the mean of the
        deltas' rows that have them (0 where none does); a delta's rows it lacks are the base's (δ = 0)."""
        x, present = self._rows(src, t, start, count)
        if bool(present.all()):
            return x
        if src is self.plan.base:
            total = torch.zeros_like(x)
            n = torch.zeros_like(x)
            for s in {id(s): s for _, s in self.plan.deltas}.values():
                v, ok = self._rows(s, t, start, count)
                total += torch.where(ok, v, torch.zeros_like(v))
                n += ok.to(x.dtype)
            fill = torch.where(n > 0, total / n.clamp(min=1), torch.zeros_like(total))
            return torch.where(present, x, fill)
        return torch.where(present, x, base if base is not None else self._aligned(self.plan.base, t, start, count))

    def delta(self, i: int, t: TensorPlan, start: int, count: int, base: torch.Tensor | None, copy: bool = True,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Delta i: θ_i − its base (the recipe's `base` block, or the delta's own base for a transplant).
        A delta artifact hands over its decoded delta directly: no (base + δ̂) − base round trip."""
        cached = self._cache.get(t.name, {}).get(start)
        if cached is not None:
            d = cached[i]
            return d.clone() if copy else d  # `copy=False`: the caller only reads it
        src = self.plan.deltas[i][1]
        if src.artifact is not None and src.artifact.is_compressed(t.name) and not src.artifact.is_sparse(t.name):
            d = src.artifact.decoded(t.name, start, count, self.device)
            return d if out is None else out.copy_(d)
        own = self._own_base[i]
        if own is not None:
            base = self.load(own, t, start, count)
        elif base is None:
            base = self.load(self.plan.base, t, start, count)
        if src.artifact is not None and src.artifact.is_sparse(t.name):  # stored output values: rebuilt on the base
            d = src.artifact.sparse_delta(t.name, start, count, base)
            return d if out is None else out.copy_(d)
        return self.load(src, t, start, count, out=out, base=base).sub_(base)

    def _mapped(self, t: TensorPlan) -> list[tuple[MappedFile, TensorInfo]]:
        return [self.inputs.get(src, t.name) for src in self.plan.reads(t) if src.artifact is None or not src.artifact.is_compressed(t.name)]

    def stream_pieces(self, order: list[TensorPlan]) -> dict[Path, list[tuple[tuple[str, int], int, int]]]:
        """The blocks of the tensors that run in one pass (`fusable`), in the order `order` computes
        them, as `Inputs.stream` takes them; those tensors are then read from the streams."""
        pieces: dict[Path, list[tuple[tuple[str, int], int, int]]] = {}
        for t in order:
            if self.fusable(t) is None:
                continue
            self._streamed.add(t.name)
            for src in [self.plan.base] + [s for _, s in self.plan.deltas]:
                mf, info = self.inputs.get(src, t.name)
                size = itemsize(info.dtype)
                at = mf.header.data_start + info.begin
                for start, count in self.ranges(t):
                    if count:
                        pieces.setdefault(mf.header.path, []).append(((t.name, start), at + start * size, at + (start + count) * size))
        return pieces

    def reading(self, t: TensorPlan) -> None:
        """Tell the run's input hashes how far the reads of tensor t go (waiting if they lag far behind)."""
        if self.inputs.pacer is not None and t.name not in self._streamed:
            for mf, info in self._mapped(t):
                self.inputs.pacer.reading(mf.header.path, mf.header.data_start + info.end)

    def prefetch(self, t: TensorPlan) -> None:
        """Ask the kernel to read tensor t's input bytes now (posix_fadvise WILLNEED; it can block while
        it queues the reads, so the engine calls it from a thread of its own)."""
        if t.name in self._streamed:
            return
        for mf, info in self._mapped(t):
            mf.prefetch(info, 0, info.numel)

    def weights_of(self, t: TensorPlan) -> tuple[float, ...]:
        return t.weights if t.weights is not None else self.weights

    def combine_of(self, t: TensorPlan) -> CombineConfig:
        return t.combine if t.combine is not None else self.plan.recipe.combine

    def streams(self, t: TensorPlan) -> bool:
        """Not elementwise, but every such step gathers its statistics in a pre-pass over blocks
        (`prepare`) and then runs per block."""
        steps = [e for es in t.edits for e in es] + [self.combine_of(t)]
        return t.edit and not t.elementwise and all(s.elementwise or s.streams for s in steps)

    def ranges(self, t: TensorPlan) -> list[tuple[int, int]]:
        """(start, count) of each block: whole tensors unless every step is elementwise or streams."""
        n = t.numel
        step = self.block if (t.elementwise or not t.edit or self.streams(t)) else max(n, 1)
        return [(s, min(step, n - s)) for s in range(0, max(n, 1), step)]

    def _edited(self, t: TensorPlan, states: dict, start: int, count: int, base: torch.Tensor | None, i: int, upto: int,
                copy: bool = True) -> torch.Tensor:
        """Delta i of a block, after its first `upto` edits (`copy=False`: the caller only reads it)."""
        d = self.delta(i, t, start, count, base, copy=copy or upto > 0)
        for j, edit in enumerate(t.edits[i][:upto]):
            d = edit.apply(d, self.context(t, i, j, start, states.get((i, j))))
        return d

    def context(self, t: TensorPlan, i: int, j: int, start: int = 0, state: object = None) -> TensorContext:
        """What edit j of delta i sees for tensor t: where the block sits, its pre-pass state and
        its entry in the run state (learned scales, a global selection)."""
        return TensorContext(t.name, t.shape, start, state, self.run.entry(t.edits[i][j], t.name), self.aliases[i], columns=t.columns)

    def edited_delta(self, t: TensorPlan, i: int, upto: int | None = None) -> torch.Tensor:
        """The whole tensor's delta i (θ_i − base) after its first `upto` edits (default: all), float32
        in the tensor's shape on the computer's device. The one way the pre-run phases (distillation,
        global statistics) get a whole edited delta; the compressed writer
        (`encoded_parts`) walks the same steps itself because it also reports the raw delta's norm."""
        n = t.numel
        base = self.load(self.plan.base, t, 0, n)
        d = self.delta(i, t, 0, n, base).view(t.shape)
        del base
        for j, edit in enumerate(t.edits[i] if upto is None else t.edits[i][:upto]):
            d = edit.apply(d, self.context(t, i, j))
        return d

    def encoded_parts(self, t: TensorPlan, stats: TensorStats | None) -> Iterator[torch.Tensor]:
        """`format: delta`: the stored parts of one compressed tensor, in `t.parts` order, on the CPU.

        The codec is the last edit of the recipe's only delta; the stats get the norms and the
        codec's relative error (from its closed-form diagnostics when it gives them)."""
        (spec, _), = self.plan.deltas
        last = len(t.edits[0]) - 1
        raw = self.delta(0, t, 0, t.numel, self.load(self.plan.base, t, 0, t.numel)).view(t.shape)
        before = float(torch.linalg.vector_norm(raw)) if stats is not None else 0.0
        d = raw
        for j, edit in enumerate(t.edits[0][:last]):
            d = edit.apply(d, self.context(t, 0, j))
        del raw
        ctx = self.context(t, 0, last)
        if t.transposed:  # per-row scales follow the outputs: encode the transpose (recorded as such)
            d = d.transpose(-1, -2).contiguous()
        parts = t.codec.encode(d, ctx)
        for x in parts.values():  # a NaN/Inf delta gives a NaN scale: never stored silently
            if x.is_floating_point() and not torch.isfinite(x.sum(dtype=torch.float32)):
                self.nonfinite(t, 0, t.numel, x, stats)
        if stats is not None:
            target = float(torch.linalg.vector_norm(d))
            if "_dot" in parts and "_sq" in parts:  # the codec's closed form: no decode needed
                dot, sq = float(parts["_dot"]), float(parts["_sq"])
            else:
                approx = t.codec.decode(parts, tuple(d.shape), ctx.run).to(d.device)
                dot, sq = float(torch.dot(approx.reshape(-1), d.reshape(-1))), float(torch.dot(approx.reshape(-1), approx.reshape(-1)))
                del approx
            err = max(target * target - 2 * dot + sq, 0.0) ** 0.5
            stats.delta_norm = {spec.model: before}
            stats.edited_norm = {spec.model: target}
            stats.combined_norm = sq ** 0.5
            info: dict = {"relative_error": err / target if target else 0.0}
            scale = parts["scale"]
            if scale.numel() <= 16:
                info["scale"] = [float(x) for x in scale.reshape(-1)]
            stats.extra.update(info)
        del d
        for out in t.parts:
            x = parts[out.name.rsplit(".", 1)[1]]
            if x.dtype != DTYPES[out.dtype] or tuple(x.shape) != tuple(out.shape):
                raise RuntimeError(f"{t.codec.op} produced {out.name} as {x.dtype}{list(x.shape)}, planned {out.dtype}{list(out.shape)}")
            yield x.contiguous().cpu()

    def nonfinite(self, t: TensorPlan, start: int, count: int, out: torch.Tensor, stats: TensorStats | None) -> None:
        """Called when a computed block's sum is not finite: confirm, find the culprit, warn or raise.

        Only then are the block's inputs re-read, to name the one holding the NaN/Inf; a non-finite
        input an edit discards (DARE drops it, TIES trims it) never reaches the output and is not
        reported. NaN·0 is NaN, so a zero weight does not hide one."""
        found = _first_bad(out)
        if found is None:
            return  # a finite block whose sum overflowed
        n, i, value = found
        plan = self.plan
        culprits = []
        aliases = dict.fromkeys([plan.recipe.base] + [a for d in plan.recipe.deltas for a in (d.model, d.base) if a])
        for alias, src in [(a, plan.sources[a]) for a in aliases]:
            if src.artifact is not None and src.artifact.is_compressed(t.name):
                continue
            bad = _first_bad(self.load(src, t, start, count))
            if bad is not None:
                culprits.append((alias, src.path_of(src.weight_map[t.name]), bad))
        if culprits:
            alias, path, (m, j, v) = culprits[0]
            what = f"{path}: tensor {t.name!r} of '{alias}' holds {v} at index {start + j}"
            if m > 1:
                what += f" ({m} NaN/Inf values in elements {start}..{start + count - 1})"
            if len(culprits) > 1:
                what += f", and so does '{culprits[1][0]}'"
        else:
            what = (f"output tensor {t.name!r} becomes {value} at index {start + i} although its inputs are finite: the"
                    f" recipe's weights or edit parameters overflow {str(out.dtype).removeprefix('torch.')}")
        if plan.recipe.output.on_nonfinite == "warn":
            first = True
            if stats is not None:
                with _COUNT_LOCK:
                    first = "nonfinite" not in stats.extra
                    stats.extra["nonfinite"] = stats.extra.get("nonfinite", 0) + n
            if first:  # one line per tensor; the total goes to weightx.json
                warnings.warn(f"{what}; written anyway (output.on_nonfinite: warn)", NonFiniteWarning, stacklevel=2)
            return
        fix = "re-download or repair that checkpoint" if culprits else "lower them"
        err = InputError if culprits else UsageError
        raise err(f"{what}; {fix}, or set output.on_nonfinite: warn to write NaN/Inf values anyway")

    def prepare(self, t: TensorPlan) -> dict:
        """Run the pre-passes of a streamed tensor's non-elementwise steps, in pipeline order: each
        pass recomputes the blocks' deltas from the mapped inputs up to that step (block memory)."""
        with self._state_lock:
            states = self._states.get(t.name)
            if states is not None:
                return states
            states = {}
            ctx = TensorContext(t.name, t.shape, 0)
            self._fill_cache(t)
            for i in range(len(self.plan.deltas)):
                for j, edit in enumerate(t.edits[i]):
                    if edit.elementwise:
                        continue

                    def one(start: int, count: int, readonly: bool, i: int = i, j: int = j) -> list[torch.Tensor]:
                        return [self._edited(t, states, start, count, None, i, j, copy=not readonly).contiguous()]

                    states[(i, j)] = edit.prepare(_BlockSource(one, self.ranges(t), self.pool, self.workers), self.context(t, i, j))
            combine = self.combine_of(t)
            if not combine.elementwise:
                def every(start: int, count: int, readonly: bool) -> list[torch.Tensor]:
                    cached = start in self._cache.get(t.name, {})  # else one base conversion serves every delta
                    base = None if cached else self.load(self.plan.base, t, start, count)
                    n = len(self.plan.deltas)
                    return [self._edited(t, states, start, count, base, i, len(t.edits[i]), copy=not readonly).contiguous()
                            for i in range(n)]

                states["combine"] = combine.prepare(_BlockSource(every, self.ranges(t), self.pool, self.workers), list(self.weights_of(t)), ctx)
            self._states[t.name] = states
            return states

    def _fill_cache(self, t: TensorPlan) -> None:
        """Decode a streamed tensor's raw deltas once, for its leading blocks that fit PASS_CACHE_BYTES."""
        m = len(self.plan.deltas)
        room = PASS_CACHE_BYTES // (4 * m)  # elements per delta
        ranges = []
        for start, count in self.ranges(t):
            if start + count > room:
                break
            ranges.append((start, count))
        if not ranges or self._cache:
            return
        n = ranges[-1][0] + ranges[-1][1]
        # One buffer serves every tensor: fresh allocations per tensor went back to the OS between
        # tensors and were faulted in (and zeroed) again.
        if self._arena is None:
            fits = [min(u.numel, room) for u in self.plan.tensors if self.streams(u)]
            self._arena = torch.empty(m * max(fits + [n]), dtype=torch.float32, device=self.device)
        regions = [self._arena[j * n:(j + 1) * n] for j in range(m)]

        def decode(start: int, count: int, readonly: bool = True) -> list[torch.Tensor]:
            base = self.load(self.plan.base, t, start, count)
            return [self.delta(i, t, start, count, base, out=regions[i][start:start + count])
                    for i in range(len(self.plan.deltas))]

        src = _BlockSource(decode, ranges, self.pool, self.workers)
        self._cache[t.name] = dict(src.imap(lambda start, xs: (start, xs)))

    def combined(self, t: TensorPlan, start: int, count: int, part: Partial | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(base block, combined delta block) of an edited tensor, float32, flat: the formula before
        θ_out = base + combined is rounded. `part` gets the block's squared norms."""
        streamed = self.streams(t)
        states = self.prepare(t) if streamed else {}
        base = self.load(self.plan.base, t, start, count)
        deltas = []
        for i in range(len(self.plan.deltas)):
            d = self.delta(i, t, start, count, base)
            if not t.elementwise and not streamed:
                d = d.view(t.shape)
            if part is not None:
                part.before[i] = _sq(d)
            for j, edit in enumerate(t.edits[i]):
                d = edit.apply(d, self.context(t, i, j, start, states.get((i, j)) if streamed else None))
            if part is not None:
                part.after[i] = _sq(d)
            deltas.append(d)
        combine = self.combine_of(t)
        # What a run-level phase learned for the recipe's combine (whole-model TIES), keyed by it.
        learned = self.run.entry(self.plan.recipe.combine, t.name)
        ctx = TensorContext(t.name, t.shape, start, states.get("combine") if streamed else None, learned,
                            base=(base if streamed or t.elementwise else base.view(t.shape)) if combine.needs_base else None)
        combined = combine.combine(deltas, list(self.weights_of(t)), ctx).reshape(-1)
        if part is not None:
            # One delta with weight 1 (ExPO, DARE alone) combines to itself: its norm is known.
            same = len(deltas) == 1 and combined.data_ptr() == deltas[0].data_ptr() and combined.numel() == deltas[0].numel()
            part.combined = part.after[0] if same else _sq(combined)
        return base, combined

    def combined_delta(self, t: TensorPlan, stats: TensorStats | None = None) -> torch.Tensor:
        """The whole tensor's combined delta (θ_out − base before rounding), float32 in its shape."""
        out = torch.empty(t.numel, dtype=torch.float32, device=self.device)
        parts = []
        for start, count in self.ranges(t):
            part = Partial(len(self.aliases)) if stats is not None else None
            out[start:start + count] = self.combined(t, start, count, part)[1]
            parts.append(part)
        self.finish(stats, parts)
        self.release(t)
        return out.view(t.shape)

    def fusable(self, t: TensorPlan) -> Fused | None:
        """How tensor t runs in one pass (`weightx.kernels.fused`), or None for the general path: on
        the CPU, every input and the output bf16 and read as stored (no artifact, transplant, token
        alignment or quantization), every edit δ ← c·δ or a `RandomDrop` (one per delta, at most
        MAX_FACTORS factors in all) and the combine a weighted sum. Same bytes either way; only
        the time differs."""
        if t.name in self._fused:
            return self._fused[t.name]
        plan, spec = self.plan, None
        combine = self.combine_of(t)
        lin = combine.linear(list(self.weights_of(t))) if combine.elementwise else None
        steps = [self._kernel_steps(t, i) for i in range(len(t.edits))] if self._fuse and t.edit else None
        srcs = [plan.base] + [src for _, src in plan.deltas]
        if (steps is not None and None not in steps and t.codec is None and t.rows is None and t.out_dtype == "BF16"
                and lin is not None
                and all(b is None for b in self._own_base) and self.run.entry(plan.recipe.combine, t.name) is None
                and all(s.artifact is None and t.name in s.weight_map and t.name not in s.fp8 and t.name not in s.mxfp4
                        and self.inputs.get(s, t.name)[1].dtype == "BF16" for s in srcs)
                and fused.available()):  # last: loads numba, which only a qualifying tensor should pay for
            spec = Fused([f for f, _ in steps], lin[0], lin[1], [m for _, m in steps])
        self._fused[t.name] = spec
        return spec

    def _kernel_steps(self, t: TensorPlan, i: int) -> tuple[list[float], fused.Mask | None] | None:
        """Delta i's edits of tensor t as the fused kernel takes them (its factors in order and its drop
        mask), or None when one of them is neither a factor nor the delta's only `RandomDrop`."""
        factors: list[float] = []
        mask = None
        for j, edit in enumerate(t.edits[i]):
            c = edit.linear_factor()
            if c is not None:
                factors.append(c)
                continue
            drop = edit.random_drop()
            if drop is None or mask is not None:
                return None
            if drop.drop == 0.0:
                continue  # `dare_` returns such a delta untouched
            mask = fused.Mask(self.context(t, i, j).seed_key(drop.seed), drop.drop, len(factors))
            if drop.factor != 1.0:
                factors.append(drop.factor)
        return (factors, mask) if len(factors) <= fused.MAX_FACTORS else None

    def _fused_block(self, t: TensorPlan, spec: Fused, start: int, count: int,
                     part: Partial | None) -> torch.Tensor | None:
        """An output block in one pass, its norms into `part`; None if an output is not finite."""
        srcs = [self.plan.base] + [src for _, src in self.plan.deltas]
        views = [self.inputs.block(s, t.name, start, count) for s in srcs]
        got = fused.linear_bf16(views[0], views[1:], spec.factors, spec.weights, spec.divisor, spec.masks, start)
        if got is None:
            return None
        out, before, after, combined = got
        if part is not None:
            part.before, part.after, part.combined = before, after, combined
        return out

    def compute(self, t: TensorPlan, start: int, count: int, stats: TensorStats | None = None) -> tuple[torch.Tensor, Partial | None]:
        """One output block (flat, output dtype, on the CPU) and its partial sums for the stats."""
        if not t.edit:
            mf, info = self.inputs.get(self.plan.config_source, t.name)
            return mf.view(info, start, count), None
        part = Partial(len(self.aliases)) if stats is not None else None
        spec = self.fusable(t)
        if spec is not None and count:
            out = self._fused_block(t, spec, start, count, part)
            if out is not None:
                return out, part
            # A NaN/Inf or overflowing output: the general path below owns its bytes and its message.
        base, combined = self.combined(t, start, count, part)
        x = base.add_(combined)
        out_dtype = DTYPES[t.out_dtype]
        out = x.to(out_dtype)
        if x.numel() and not _finite_after_rounding(x, out, out_dtype):
            self.nonfinite(t, start, count, out, stats)
        return (out if out.device.type == "cpu" else out.cpu()), part

    def finish(self, stats: TensorStats | None, parts: list[Partial | None]) -> None:
        """Fold block partials (in block order, so the sums never depend on thread timing)."""
        if stats is None:
            return
        n = len(self.aliases)
        before, after, comb = [0.0] * n, [0.0] * n, 0.0
        for p in parts:
            if p is not None:
                before = [a + b for a, b in zip(before, p.before)]
                after = [a + b for a, b in zip(after, p.after)]
                comb += p.combined
        stats.delta_norm = {a: before[i] ** 0.5 for i, a in enumerate(self.aliases)}
        stats.edited_norm = {a: after[i] ** 0.5 for i, a in enumerate(self.aliases)}
        stats.combined_norm = comb ** 0.5

    def release(self, t: TensorPlan) -> None:
        """Forget a finished tensor's pre-pass state and unmap its inputs (`MappedFile.done`: on a
        7B ExPO, kswapd's reclaim went from 3.0-3.4 to 1.8-2.0 CPU-s and the run 33.4-36.2 s to 31.6-33.0)."""
        with self._state_lock:
            self._states.pop(t.name, None)
            self._cache.pop(t.name, None)
        if t.name in self._streamed:
            return
        for mf, info in self._mapped(t):
            mf.done(info)

    def streamed(self, t: TensorPlan) -> bool:
        """Whether tensor t's inputs come from `Inputs.stream` (`stream_pieces`)."""
        return t.name in self._streamed

    def feed(self, t: TensorPlan, start: int) -> None:
        """Feed the input blocks at `start` of a streamed tensor to the input hashes (a job the engine
        queues after the block's compute)."""
        if t.name in self._streamed:
            for src in [self.plan.base] + [s for _, s in self.plan.deltas]:
                self.inputs.feed(src, t.name, start)

    def block_done(self, t: TensorPlan, start: int) -> None:
        """The engine has the output block at `start`: give its streamed input blocks back."""
        if t.name in self._streamed:
            for src in [self.plan.base] + [s for _, s in self.plan.deltas]:
                self.inputs.done(src, t.name, start)

    def blocks(self, t: TensorPlan, stats: TensorStats | None = None) -> Iterator[torch.Tensor]:
        """The tensor's output blocks in order, computed on this thread."""
        parts = []
        for start, count in self.ranges(t):
            out, part = self.compute(t, start, count, stats)
            parts.append(part)
            yield out
        self.finish(stats, parts)
        self.release(t)


class _BlockSource(PooledBlocks):
    """The blocks of one streamed tensor, for a pre-pass (`weightx.kernels.topk.each_block`): `make(start,
    count, readonly)` computes a block's tensors (`readonly`: they may be shared, cached ones).
    Called, it yields them in turn on this thread; `imap(fn)` computes each block and applies fn
    on the engine's pool, yielding the results in block order with at most 2 × workers blocks in
    flight."""

    def __init__(self, make: Callable[[int, int, bool], list[torch.Tensor]], ranges: list[tuple[int, int]],
                 pool: ThreadPoolExecutor | None, workers: int):
        self.make, self.ranges, self.pool, self.workers = make, ranges, pool, workers

    def __call__(self, readonly: bool = False) -> Iterator[tuple[int, list[torch.Tensor]]]:
        for start, count in self.ranges:
            yield start, self.make(start, count, readonly)

    def imap(self, fn: Callable[[int, list[torch.Tensor]], object], readonly: bool = False) -> Iterator:
        if self.pool is None:
            yield from (fn(start, xs) for start, xs in self(readonly))
            return
        window: deque[Future] = deque()
        try:
            for start, count in self.ranges:
                window.append(self.pool.submit(lambda s, c: fn(s, self.make(s, c, readonly)), start, count))
                if len(window) >= 2 * self.workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for fut in window:
                fut.cancel()


@dataclass(frozen=True)
class Fused:
    """A tensor's formula as the fused kernel takes it: per delta its factors, the weights, the divisor,
    per delta its drop mask or None."""

    factors: list[list[float]]
    weights: list[float]
    divisor: float | None
    masks: list[fused.Mask | None]


@dataclass
class Partial:
    """Squared norms of one block: each delta before and after its edits, and the combined delta."""

    n: int
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    combined: float = 0.0

    def __post_init__(self) -> None:
        self.before = [0.0] * self.n
        self.after = [0.0] * self.n


