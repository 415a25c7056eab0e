"""The streaming engine: θ_out = base + combine_i(w_i · edits_i(θ_i − base)), tensor by tensor.

Inputs are mmap'd views; each output tensor is computed in float32 (in blocks when every step is
elementwise), rounded once to the output dtype, and handed to a writer thread that streams it into
a shard whose header was laid out from the plan. Steps that need a tensor-wide statistic but can
gather it over blocks (`streams`: TIES, magnitude, DARE `l1`) get pre-passes that recompute the
blocks (run on the block pool; decoded once when the tensor fits PASS_CACHE_BYTES, else re-read
from the mappings), then run per block too. Memory is a few blocks plus, for the other
whole-tensor edits (bitdelta, ternary), a few copies of the largest tensor, whatever the model size.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from weightx.edits.base import TensorContext
from weightx.plan import Plan, TensorPlan
from weightx.safetensors_io import DTYPES, MappedFile, ShardWriter
from weightx.sources import Source
from weightx.verify import nonfinite_block

BLOCK_ELEMENTS = 1 << 20
# A streamed tensor whose float32 deltas fit in this many bytes is decoded once and kept for its
# pre-passes and final blocks instead of re-read from the mappings on every pass. A fixed budget,
# so peak memory still does not grow with the model (larger tensors re-read). The base is not
# kept: only the final blocks use it, and converting it again costs what copying it would.
PASS_CACHE_BYTES = 160 << 20


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from weightx.errors import UsageError

        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
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
    """Open mappings of every input shard, created on first use."""

    def __init__(self) -> None:
        self._maps: dict[Path, MappedFile] = {}

    def get(self, src: Source, name: str) -> tuple[MappedFile, object]:
        shard = src.weight_map[name]
        header = src.headers[shard]
        mf = self._maps.get(header.path)
        if mf is None:
            mf = self._maps[header.path] = MappedFile(header)
        return mf, header.tensors[name]

    def close(self) -> None:
        for mf in self._maps.values():
            mf.close()
        self._maps.clear()


def _sq(x: torch.Tensor) -> float:
    flat = x.reshape(-1)
    return float(torch.dot(flat, flat)) if flat.numel() else 0.0


class TensorComputer:
    """Computes one planned tensor as a sequence of output blocks (flat, in the output dtype)."""

    def __init__(self, plan: Plan, inputs: Inputs, device: torch.device, block: int = BLOCK_ELEMENTS,
                 pool: ThreadPoolExecutor | None = None, workers: int = 1):
        self.plan = plan
        self.pool = pool  # the engine's block pool: pre-passes run their blocks on it
        self.workers = workers
        # Per cached streamed tensor (see PASS_CACHE_BYTES): block start → [θ_i − base].
        self._cache: dict[str, dict[int, list[torch.Tensor]]] = {}
        self._arena: torch.Tensor | None = None  # the cache's storage, reused tensor after tensor
        self._delta_index = {id(src): i for i, (_, src) in enumerate(plan.deltas)}
        self.inputs = inputs
        self.device = device
        self.block = block
        self.aliases = [d.model for d in plan.recipe.deltas]
        self.weights = [d.weight for d in plan.recipe.deltas]
        # Per streamed tensor: what each non-elementwise step's `prepare` gathered, keyed by
        # (delta index, edit index) or "combine"; dropped when the tensor is finished.
        self._states: dict[str, dict] = {}
        self._state_lock = threading.Lock()

    def _load(self, src: Source, t: TensorPlan, start: int, count: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Block [start, start+count) of an input as float32: a fresh tensor, or `out` filled."""
        mf, info = self.inputs.get(src, t.name)
        x = mf.view(info, start, count)
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=False)
        if out is not None:
            return out.copy_(x)
        # copy=True: a float32 input must never be modified in place through its mapping.
        return x.to(torch.float32, copy=True)

    def _delta(self, src: Source, t: TensorPlan, start: int, count: int, base: torch.Tensor | None, copy: bool = True,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """θ_i − base. A delta artifact hands over its decoded delta directly: no (base + δ̂) − base round trip."""
        cached = self._cache.get(t.name)
        if cached is not None:
            d = cached[start][self._delta_index[id(src)]]
            return d.clone() if copy else d  # `copy=False`: the caller only reads it
        if src.artifact is not None and src.artifact.is_compressed(t.name):
            d = src.artifact.decoded(t.name, start, count, self.device)
            return d if out is None else out.copy_(d)
        if base is None:
            base = self._load(self.plan.base, t, start, count)
        return self._load(src, t, start, count, out=out).sub_(base)

    def prefetch(self, t: TensorPlan) -> None:
        srcs = [self.plan.config_source] if not t.edit else [self.plan.base] + [s for _, s in self.plan.deltas]
        for src in srcs:
            if src.artifact is not None and src.artifact.is_compressed(t.name):
                continue
            mf, info = self.inputs.get(src, t.name)
            mf.prefetch(info, 0, info.numel)

    def streams(self, t: TensorPlan) -> bool:
        """Not elementwise, but every such step gathers its statistics in a pre-pass over blocks
        (`prepare`) and then runs per block."""
        steps = [e for es in t.edits for e in es] + [self.plan.recipe.combine]
        return t.edit and not t.elementwise and all(s.elementwise or getattr(s, "streams", False) for s in steps)

    def ranges(self, t: TensorPlan) -> list[tuple[int, int]]:
        """(start, count) of each block: whole tensors unless every step is elementwise or streams."""
        n = t.numel
        step = self.block if (t.elementwise or not t.edit or self.streams(t)) else max(n, 1)
        return [(s, min(step, n - s)) for s in range(0, max(n, 1), step)]

    def _edited(self, t: TensorPlan, states: dict, start: int, count: int, base: torch.Tensor | None, i: int, upto: int,
                copy: bool = True) -> torch.Tensor:
        """Delta i of a block, after its first `upto` edits (`copy=False`: the caller only reads it)."""
        d = self._delta(self.plan.deltas[i][1], t, start, count, base, copy=copy or upto > 0)
        for j, edit in enumerate(t.edits[i][:upto]):
            d = edit.apply(d, TensorContext(t.name, t.shape, start, states.get((i, j))))
        return d

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

                    states[(i, j)] = edit.prepare(_BlockSource(one, self.ranges(t), self.pool, self.workers), ctx)
            combine = self.plan.recipe.combine
            if not combine.elementwise:

                def every(start: int, count: int, readonly: bool) -> list[torch.Tensor]:
                    cached = t.name in self._cache  # else one base conversion serves every delta
                    base = None if cached else self._load(self.plan.base, t, start, count)
                    n = len(self.plan.deltas)
                    return [self._edited(t, states, start, count, base, i, len(t.edits[i]), copy=not readonly).contiguous()
                            for i in range(n)]

                states["combine"] = combine.prepare(_BlockSource(every, self.ranges(t), self.pool, self.workers), list(self.weights), ctx)
            self._states[t.name] = states
            return states

    def _fill_cache(self, t: TensorPlan) -> None:
        """Decode a streamed tensor's raw deltas once when they fit PASS_CACHE_BYTES."""
        m, n = len(self.plan.deltas), t.numel
        if m * n * 4 > PASS_CACHE_BYTES:
            self._arena = None  # not held while a big tensor streams: the peak would be both
            return
        if self._cache:
            return
        # One buffer, sized for the largest cached tensor, serves them all: fresh allocations per
        # tensor went back to the OS between tensors and were faulted in (and zeroed) again.
        if self._arena is None:
            fits = [m * u.numel for u in self.plan.tensors if self.streams(u) and m * u.numel * 4 <= PASS_CACHE_BYTES]
            self._arena = torch.empty(max(fits + [m * n]), dtype=torch.float32, device=self.device)
        regions = [self._arena[j * n:(j + 1) * n] for j in range(m)]

        def decode(start: int, count: int, readonly: bool = True) -> list[torch.Tensor]:
            base = self._load(self.plan.base, t, start, count)
            return [self._delta(src, t, start, count, base, out=regions[i][start:start + count])
                    for i, (_, src) in enumerate(self.plan.deltas)]

        src = _BlockSource(decode, self.ranges(t), self.pool, self.workers)
        self._cache[t.name] = dict(src.imap(lambda start, xs: (start, xs)))

    def compute(self, t: TensorPlan, start: int, count: int, stats: TensorStats | None = None) -> tuple[torch.Tensor, Partial | None]:
        """One output block (flat, output dtype, on the CPU) and its partial sums for the stats."""
        if not t.edit:
            mf, info = self.inputs.get(self.plan.config_source, t.name)
            return mf.view(info, start, count), None
        ctx = TensorContext(t.name, t.shape, start)
        streamed = self.streams(t)
        states = self.prepare(t) if streamed else {}
        part = Partial(len(self.aliases)) if stats is not None else None
        base = self._load(self.plan.base, t, start, count)
        deltas = []
        for i, (_, src) in enumerate(self.plan.deltas):
            d = self._delta(src, t, start, count, base)
            if not t.elementwise and not streamed:
                d = d.view(t.shape)
            if part is not None:
                part.before[i] = _sq(d)
            for j, edit in enumerate(t.edits[i]):
                d = edit.apply(d, TensorContext(t.name, t.shape, start, states.get((i, j))) if streamed else ctx)
            if part is not None:
                part.after[i] = _sq(d)
            deltas.append(d)
        if streamed:
            ctx = TensorContext(t.name, t.shape, start, states.get("combine"))
        combined = self.plan.recipe.combine.combine(deltas, list(self.weights), ctx).reshape(-1)
        if part is not None:
            part.combined = _sq(combined)
        x = base.add_(combined)
        out_dtype = DTYPES[t.out_dtype]
        out = x.to(out_dtype)
        # NaN/Inf check at one reduction per block (a sum is ~30x cheaper than isfinite().all() on
        # CPU); fp16 is summed after rounding, which can overflow it. See weightx.verify.
        if not torch.isfinite((out if out_dtype == torch.float16 else x).sum(dtype=torch.float32)):
            nonfinite_block(self, t, start, count, out, stats)
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
        """Forget a finished tensor's pre-pass state."""
        with self._state_lock:
            self._states.pop(t.name, None)
            self._cache.pop(t.name, None)

    def blocks(self, t: TensorPlan, stats: TensorStats | None = None) -> Iterator[torch.Tensor]:
        """The tensor's output blocks in order, computed on this thread."""
        parts = []
        for start, count in self.ranges(t):
            out, part = self.compute(t, start, count, stats)
            parts.append(part)
            yield out
        self.finish(stats, parts)
        self.release(t)


class _BlockSource:
    """The blocks of one streamed tensor, for a pre-pass (`weightx.topk.each_block`): `make(start,
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


@contextlib.contextmanager
def _intra_op(threads: int, active: bool) -> Iterator[None]:
    """Give a whole-tensor step torch's intra-op threads while the block pool is idle."""
    if active:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if active:
            torch.set_num_threads(1)


class _Writer(threading.Thread):
    """Drains (writer, tensor) items so disk writes overlap the next block's compute. The sha256 of
    each shard runs on a second thread in write order: hashing (1.8 GB/s) costs about as much as
    the compute, so the thread that waits on the disk should not also do it."""

    def __init__(self, on_bytes: Callable[[int], None], on_shard: Callable[[ShardWriter], None] | None = None):
        super().__init__(name="weightx-writer", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.hq: queue.Queue = queue.Queue(maxsize=16)
        self.error: BaseException | None = None
        self.on_bytes = on_bytes
        self.on_shard = on_shard
        self._hasher = threading.Thread(target=self._hash, name="weightx-hash-out", daemon=True)

    def start(self) -> None:
        self._hasher.start()
        super().start()

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        self._hasher.join(timeout)

    def run(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                if self.error is not None:
                    continue  # keep draining so the producer never blocks forever
                writer, data = item
                try:
                    if data is None:
                        writer.close()
                        self.hq.put((writer, None))  # complete and fsynced: the hasher finishes it
                    else:
                        raw = writer.raw(data)
                        writer.write_raw(raw)
                        self.hq.put((writer, raw))
                        self.on_bytes(raw.nbytes)
                except BaseException as e:
                    self.error = e
        finally:
            self.hq.put(None)

    def _hash(self) -> None:
        while True:
            item = self.hq.get()
            if item is None:
                return
            if self.error is not None:
                continue
            writer, raw = item
            try:
                if raw is not None:
                    writer.hash_raw(raw)
                else:
                    writer.finish_hash()
                    if self.on_shard is not None:  # writer.sha256 is set
                        self.on_shard(writer)
            except BaseException as e:
                self.error = e

    def put(self, writer: ShardWriter, data: torch.Tensor | None) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((writer, data))


def write_shards(
    plan: Plan,
    folder: Path,
    device: torch.device,
    progress: Callable[[int], None] = lambda n: None,
    block: int = BLOCK_ELEMENTS,
    shards: list | None = None,
    on_shard: Callable[[ShardWriter, dict[str, TensorStats]], None] | None = None,
    workers: int | None = None,
) -> dict[str, TensorStats]:
    """Compute the planned tensors (of `shards`, default all) into `folder`; return per-tensor stats.

    `on_shard(writer, stats)` runs on the output hashing thread once a shard is complete and fsynced (for
    its hash and the resume record); the stats of that shard's tensors are final by then."""
    inputs = Inputs()
    stats: dict[str, TensorStats] = {}
    writer = _Writer(progress, (lambda sw: on_shard(sw, stats)) if on_shard is not None else None)
    writer.start()
    open_writers: list[ShardWriter] = []
    shards = plan.shards if shards is None else shards
    order = [t for s in shards for t in s.tensors]
    # Elementwise tensors are cut into blocks that `workers` threads compute side by side with
    # one intra-op thread each: coarse parallelism, immune to OpenMP's per-op fork/join cost on
    # small blocks. Whole-tensor steps (top-k, compression) keep torch's intra-op threads instead.
    threads = torch.get_num_threads()
    workers = threads if (device.type == "cpu" and threads > 1 and workers is None) else (workers or 1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="weightx-compute") if workers > 1 else None
    computer = TensorComputer(plan, inputs, device, block, pool, workers)
    pending: deque = deque()  # (shard writer, tensor, stats, parts, future or value, last block?)

    def drain(keep: int) -> None:
        while len(pending) > keep:
            sw, t, st, parts, fut, last = pending.popleft()
            out, part = fut.result() if isinstance(fut, Future) else fut
            parts.append(part)
            writer.put(sw, out)
            if last:
                computer.finish(st, parts)
                computer.release(t)

    nxt = 1
    try:
        if pool is not None:
            torch.set_num_threads(1)
        for shard in shards:
            sw = ShardWriter(folder / shard.filename, [o for t in shard.tensors for o in t.outs], hash_on_close=False)
            open_writers.append(sw)
            for t in shard.tensors:
                if nxt < len(order):
                    computer.prefetch(order[nxt])
                nxt += 1
                st = stats[t.name] = TensorStats() if t.edit else None
                if t.codec is not None:  # format: delta, a compressed tensor: write its parts
                    from weightx.delta_artifact import compressed_parts

                    drain(0)
                    with _intra_op(threads, pool is not None):
                        for out in compressed_parts(computer, t, st):
                            writer.put(sw, out)
                    continue
                ranges = computer.ranges(t)
                parts: list = []
                if t.edit and computer.streams(t):
                    # The pre-passes run their blocks on the pool (one intra-op thread each).
                    drain(0)
                    computer.prepare(t)
                if pool is None or (t.edit and not t.elementwise and not computer.streams(t)):
                    drain(0)
                    with _intra_op(threads, pool is not None):
                        for i, (start, count) in enumerate(ranges):
                            pending.append((sw, t, st, parts, computer.compute(t, start, count, st), i == len(ranges) - 1))
                            drain(0)
                    continue
                for i, (start, count) in enumerate(ranges):
                    fut = pool.submit(computer.compute, t, start, count, st) if t.edit else computer.compute(t, start, count, st)
                    pending.append((sw, t, st, parts, fut, i == len(ranges) - 1))
                    drain(2 * workers)
            drain(0)
            writer.put(sw, None)
        writer.q.put(None)
        writer.join()
        if writer.error is not None:
            raise writer.error
    except BaseException:
        for item in pending:
            if isinstance(item[4], Future):
                item[4].cancel()
        if writer.is_alive():
            writer.error = writer.error or RuntimeError("aborted")
            writer.q.put(None)
            writer.join()
        for sw in open_writers:
            sw.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)
        inputs.close()
    return {k: v for k, v in stats.items() if v is not None}
