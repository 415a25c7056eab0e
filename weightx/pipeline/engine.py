"""The streaming engine: computes the planned tensors block by block and writes them into shards.

Inputs are mmap'd views, or for the one-pass tensors blocks read ahead with O_DIRECT
(`weightx.io.stream`, whose input hash jobs share the block pool); each output tensor is computed
in float32 (`weightx.pipeline.compute`, in blocks when every step is elementwise or streams), rounded once to the output dtype, and handed to
a writer thread that streams it into a shard whose header was laid out from the plan. Memory is a
few blocks plus, for the whole-tensor edits (bitdelta, ternary), a few copies of the largest
tensor, whatever the model size.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch

from weightx.io import stream
from weightx.io.provenance import Pacer, hashing_enabled
from weightx.io.safetensors import ShardWriter
from weightx.pipeline.compute import BLOCK_ELEMENTS, Inputs, TensorComputer, TensorStats
from weightx.pipeline.plan import Plan, TensorPlan
from weightx.pipeline.state import RunState


@functools.cache
def _tune_malloc() -> None:
    """Keep freed block buffers in the process instead of handing them back to the kernel.

    Every block allocates a few float32 buffers; glibc serves those from fresh mmaps (or trims
    them off its heaps) and the next block faults the same amount of zeroed memory back in: on a
    7B merge, ~3 million page faults and a third of the run's kernel time. A 32 MB mmap threshold
    (glibc's maximum) and a 64 MB trim threshold keep them reusable. Process-wide and glibc-only,
    set once; elsewhere this does nothing."""
    try:
        import ctypes  # a glibc call: no need to load ctypes unless a run starts

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


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


# Output blocks waiting for the disk or for the hash, at most (a single larger block still passes).
# Counted in bytes, not blocks, so a larger block size cannot raise the peak: where the hash is the
# slowest stage the queues stay full (16 + 8 blocks of 8 MB, when fused blocks were 4M elements,
# were 190 MB of a 7B run's peak).
QUEUED_BYTES = 48 << 20


class _Writer(threading.Thread):
    """Drains (writer, tensor) items so disk writes overlap the next block's compute. The sha256 of
    each shard runs on a second thread in write order: hashing (~1.7 GB/s a core, staged through
    L2 by `io.sha256`) costs about as much as the compute, so the thread that waits on the
    disk should not also do it."""

    def __init__(self, on_bytes: Callable[[int], None], on_shard: Callable[[ShardWriter], None] | None = None):
        super().__init__(name="weightx-writer", daemon=True)
        self.q: queue.Queue = queue.Queue()
        self.hq: queue.Queue = queue.Queue()
        self._queued = 0  # bytes of blocks put and not yet written and hashed (QUEUED_BYTES)
        self._room = threading.Condition()
        self.error: BaseException | None = None
        self.on_bytes = on_bytes
        self.on_shard = on_shard
        self._hasher = threading.Thread(target=self._hash, name="weightx-hash-out", daemon=True)
        self.hashing = hashing_enabled()

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
                        if self.hashing:
                            self.hq.put((writer, raw))
                        else:
                            self._done(raw.nbytes)
                        self.on_bytes(raw.nbytes)
                except BaseException as e:
                    self.error = e
                    self._done(None)
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
                    self._done(raw.nbytes)
                else:
                    if self.hashing:
                        writer.finish_hash()
                    if self.on_shard is not None:  # writer.sha256 is set
                        self.on_shard(writer)
            except BaseException as e:
                self.error = e
                self._done(None)

    def _done(self, nbytes: int | None) -> None:
        """A block is written and hashed (None: a stage failed, so nobody waits for room again)."""
        with self._room:
            self._queued = 0 if nbytes is None else self._queued - nbytes
            self._room.notify_all()

    def put(self, writer: ShardWriter, data: torch.Tensor | None) -> None:
        if data is not None:
            n = data.numel() * data.element_size()
            with self._room:
                while self._queued and self._queued + n > QUEUED_BYTES and self.error is None:
                    self._room.wait(1.0)
                self._queued += n
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
    run: RunState | None = None,
    pacer: Pacer | None = None,
) -> dict[str, TensorStats]:
    """Compute the planned tensors (of `shards`, default all) into `folder`; return per-tensor stats.

    `on_shard(writer, stats)` runs on the output hashing thread once a shard is complete and fsynced (for
    its hash and the resume record); the stats of that shard's tensors are final by then. `pacer`
    keeps the run's input hashes beside the reads (`weightx.io.provenance.Pacer`)."""
    _tune_malloc()
    inputs = Inputs(pacer)
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
    # Asking the kernel for the next tensor's reads can block for a while as it queues them: on its
    # own thread, so the thread that feeds the block pool never waits on it.
    prefetcher = ThreadPoolExecutor(1, thread_name_prefix="weightx-prefetch")
    computer = TensorComputer(plan, inputs, device, block, pool, workers, run)
    pending: deque = deque()  # (shard writer, tensor, stats, parts, block start, future or value, last block?)

    def drain(keep: int) -> None:
        while len(pending) > keep:
            sw, t, st, parts, start, fut, last = pending.popleft()
            out, part = fut.result() if isinstance(fut, Future) else fut
            computer.block_done(t, start)
            parts.append(part)
            writer.put(sw, out)
            if last:
                computer.finish(st, parts)
                computer.release(t)

    def read_ahead(u: TensorPlan) -> None:
        computer.reading(u)  # may wait for the input hashes (pacing)
        prefetcher.submit(computer.prefetch, u)

    nxt = 1
    try:
        if device.type == "cpu" and stream.available():
            # One-pass tensors read their inputs from O_DIRECT streams (`io.stream`). The blocks in
            # flight (2 × workers, and the ones being added and drained) span about this many
            # chunks; four more let the reads run ahead (two measured ~1 s slower on the 7B ExPO).
            in_flight = (2 * workers + 2) * block * 2  # bf16: the one-pass tensors' input dtype
            inputs.stream(computer.stream_pieces(order), 4 + -(-in_flight // stream.CHUNK))
        if order:
            read_ahead(order[0])
        if pool is not None:
            torch.set_num_threads(1)
        for shard in shards:
            sw = ShardWriter(folder / shard.filename, [o for t in shard.tensors for o in t.outs], hash_on_close=False)
            open_writers.append(sw)
            for t in shard.tensors:
                # The next tensor only: asking the kernel for more (512 MB ahead) measured slower
                # on the 7B benchmark (34-37 s against 27-33 s), the reads crowding each other out.
                if nxt < len(order):
                    read_ahead(order[nxt])
                nxt += 1
                st = stats[t.name] = TensorStats() if t.edit else None
                if t.codec is not None:  # format: delta, a compressed tensor: write its parts
                    drain(0)
                    with _intra_op(threads, pool is not None):
                        for out in computer.encoded_parts(t, st):
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
                            pending.append((sw, t, st, parts, start, computer.compute(t, start, count, st), i == len(ranges) - 1))
                            computer.feed(t, start)
                            drain(0)
                    continue
                for i, (start, count) in enumerate(ranges):
                    fut = pool.submit(computer.compute, t, start, count, st) if t.edit else computer.compute(t, start, count, st)
                    if computer.streamed(t):
                        pool.submit(computer.feed, t, start)  # no one waits on it: its errors stop the stream
                    pending.append((sw, t, st, parts, start, fut, i == len(ranges) - 1))
                    drain(2 * workers)
            drain(0)
            writer.put(sw, None)
        writer.q.put(None)
        writer.join()
        if writer.error is not None:
            raise writer.error
    except BaseException:
        for item in pending:
            if isinstance(item[5], Future):
                item[5].cancel()
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
        prefetcher.shutdown(wait=True, cancel_futures=True)  # before the mappings it advises close
        inputs.close()
    return {k: v for k, v in stats.items() if v is not None}
