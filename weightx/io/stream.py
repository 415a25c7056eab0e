"""An input file read front to back with O_DIRECT into a few reused buffers, for the engine's
one-pass tensors.

Through the page cache, a 7B merge's 27 GB of inputs cost the 2-core VM 13-22 s of kernel CPU:
every read fills freshly allocated page-cache pages, the input hash copies them out again with
pread, the compute faults them into its mappings and kswapd reclaims them all (an uncached `cat`
of one 4.5 GB shard took 5.2-6.2 s of system time, an O_DIRECT read of it 0.1-0.2 s). Here the
disk writes straight into a buffer that the compute and the input hash both read, and the buffer
is reused once both are done: 7B ExPO first runs used 5-7 s of system time instead of 13-22.

The engine says up front which blocks it will read and in which order (pieces: one block of one
tensor in this file). READERS threads read them, grouped into CHUNK-sized reads, as far ahead as
`buffers` allow; `view` hands a block to the compute once its chunk is in and `release` gives it
back; `feed` jobs, which the engine queues on its compute pool, give the chunks to the file's
sha256 in file order. A filesystem that takes O_DIRECT at open but refuses the reads gets
ordinary preads into the same buffers.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import torch

from weightx.errors import InputError
from weightx.io.direct import ALIGN, direct_enabled
from weightx.io.files import open_regular

CHUNK = 4 << 20  # one disk read; 8 MB measured no faster here and doubles the buffers' memory
READERS = 2  # reads in flight per file

# (file offset, bytes read there) -> None: hashes them in file order (`provenance._Running.feed`)
Feed = Callable[[int, memoryview], None]


@dataclass
class _Chunk:
    lo: int  # aligned file offset the read starts at
    end: int  # the bytes up to here must be in the file (the last piece's end)
    holds: int = 0  # uses of its pieces not yet released, + 1 until the hash has it
    buf: mmap.mmap | None = None  # while read and held
    n: int = 0  # bytes read
    done: bool = False  # read (its buffer may be free again)


class DirectStream:
    """Reads `pieces` — (key, lo, hi): file bytes [lo, hi) under a key the compute asks for, in the
    order it will ask — ahead of the compute, into at most `buffers` reused buffers. A key listed
    twice (one file read as two inputs) is read once and released twice. `feed`, when given, gets
    every chunk once, in file order (`feed(key)` jobs); `fed()` is called once that is over
    (every chunk fed, a failure, or `close`)."""

    def __init__(self, path: Path, pieces: list[tuple[Hashable, int, int]], buffers: int, feed: Feed | None = None,
                 fed: Callable[[], None] | None = None):
        self.path = path
        self._feed = feed
        self._fed = fed  # called once when feeding ends: every chunk fed, or stopped
        self._chunks: list[_Chunk] = []
        self._where: dict[Hashable, tuple[int, int, int]] = {}  # key -> (chunk, lo, hi)
        self._uses: dict[Hashable, int] = {}
        size = ALIGN
        for key, lo, hi in pieces:
            if key in self._where:
                self._uses[key] += 1
                continue
            last = self._chunks[-1] if self._chunks else None
            if last is None or lo != last.end or _up(hi) - last.lo > CHUNK:
                last = _Chunk(lo - lo % ALIGN, hi)
                self._chunks.append(last)
            last.end = hi
            self._where[key] = (len(self._chunks) - 1, lo, hi)
            self._uses[key] = 1
            size = max(size, _up(hi) - last.lo)
        for key, (c, _, _) in self._where.items():
            self._chunks[c].holds += self._uses[key]
        for c in self._chunks:
            c.holds += feed is not None
        self._size = size
        self._buffers = max(1, buffers)
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._issued = 0  # chunks a reader has taken
        self._read = 0  # chunks read
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._fd = -1
        self._next = 0  # the chunk the hash is due next
        self._feeding = False  # a thread is in `feed`

    def start(self) -> None:
        """Start reading (and hashing); idempotent. The first `view` starts it, so files further on
        take no buffers yet."""
        with self._cond:
            if self._threads or self._stop:
                return
            try:
                self._fd = _open(self.path)
            except BaseException as e:
                self._error = e
                self._cond.notify_all()
                return
            self._threads = [threading.Thread(target=self._reader, name="weightx-read", daemon=True) for _ in range(READERS)]
            for t in self._threads:  # under the lock: a `close` racing this start never joins an unstarted thread
                t.start()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where

    def view(self, key: Hashable, dtype: torch.dtype, count: int) -> torch.Tensor:
        """The piece `key` as a flat tensor of `count` elements, waiting for its read. Valid until
        `release(key)`."""
        self.start()
        c, lo, hi = self._where[key]
        chunk = self._chunks[c]
        with self._cond:
            while not chunk.done and self._error is None and not self._stop:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            if chunk.buf is None:
                raise RuntimeError(f"{self.path}: piece {key!r} asked for after its release or the stream's close")
            return torch.frombuffer(chunk.buf, dtype=dtype, count=count, offset=lo - chunk.lo)

    def feed(self, key: Hashable | None = None) -> None:
        """Give the file's hash every chunk now due (read, in file order), unless another thread is
        at it already; never waits. The engine queues one such job per block on its compute pool,
        after the block's compute; a reader short of buffers does the same, so the hash never
        holds the stream up for want of a job. A failure stops the stream: the next `view` raises it."""
        if self._feed is None:
            return
        with self._cond:
            if self._feeding:
                return
            self._feeding = True
        done = False
        try:
            while True:
                with self._cond:
                    chunk = self._chunks[self._next] if self._next < len(self._chunks) else None
                    if chunk is None or not chunk.done or chunk.buf is None or self._stop:
                        self._feeding = False
                        done = chunk is None
                        break
                    buf, n = chunk.buf, chunk.n
                view = memoryview(buf)
                try:
                    self._feed(chunk.lo, view[:n])
                finally:
                    view.release()
                with self._cond:
                    self._next += 1
                    self._drop(chunk)
        except BaseException as e:
            with self._cond:
                self._feeding = False
                self._error = e
                self._cond.notify_all()
            return
        if done:
            self._end_feed()

    def release(self, key: Hashable) -> None:
        """The compute is done with one use of piece `key`."""
        with self._cond:
            self._drop(self._chunks[self._where[key][0]])

    def close(self) -> None:
        """Stop the threads (a read in flight finishes first) and let the buffers go."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        self._end_feed()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._free.clear()
        for c in self._chunks:
            c.buf = None  # a view still held keeps its buffer alive until it goes

    # ---- threads ----

    def _drop(self, chunk: _Chunk) -> None:
        """One hold of `chunk` is gone (under the lock); its buffer is free after the last."""
        chunk.holds -= 1
        if chunk.holds == 0 and chunk.buf is not None:
            self._recycle(chunk.buf)
            chunk.buf = None

    def _recycle(self, buf: mmap.mmap) -> None:
        """(Under the lock.) Once every chunk is read the buffers go back to the system, not to the pool:
        the engine reads the next file while this one's stream stays open until the run ends."""
        if self._read < len(self._chunks):
            self._free.append(buf)
            self._cond.notify_all()

    def _end_feed(self) -> None:
        with self._cond:
            fed, self._fed = self._fed, None
        if fed is not None:
            fed()

    def _buffer(self) -> mmap.mmap | None:
        """A free buffer (under the lock), waiting for one; None once stopped. While none is free and
        the hash is due on a chunk read already, this thread feeds it (which frees buffers)."""
        while not self._stop:
            if self._free:
                return self._free.pop()
            if self._made < self._buffers:
                self._made += 1
                return mmap.mmap(-1, self._size)  # anonymous maps are page-aligned, as O_DIRECT needs
            if self._hash_due():
                self._cond.release()
                try:
                    self.feed(None)
                finally:
                    self._cond.acquire()
                continue
            self._cond.wait()
        return None

    def _hash_due(self) -> bool:
        """(Under the lock.) Whether `feed` has a read chunk to take and nobody is feeding."""
        if self._feed is None or self._feeding or self._next >= len(self._chunks):
            return False
        chunk = self._chunks[self._next]
        return chunk.done and chunk.buf is not None

    def _reader(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._issued == len(self._chunks):
                        return
                    buf = self._buffer()
                    if buf is None:
                        return
                    if self._issued == len(self._chunks):  # another reader took the last chunk meanwhile
                        self._recycle(buf)
                        return
                    chunk = self._chunks[self._issued]
                    self._issued += 1
                n = self._pread(buf, chunk)
                with self._cond:
                    chunk.buf, chunk.n, chunk.done = buf, n, True
                    self._read += 1
                    if chunk.holds == 0:  # every use was released unread (a failed block)
                        self._recycle(buf)
                        chunk.buf = None
                    if self._read == len(self._chunks):
                        self._free.clear()
                    self._cond.notify_all()
                    last = self._read == len(self._chunks)
                if last:
                    self.feed(None)  # whatever no compute job will feed any more
        except BaseException as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _pread(self, buf: mmap.mmap, chunk: _Chunk) -> int:
        want = min(self._size, _up(chunk.end) - chunk.lo)
        view, got = memoryview(buf), 0
        try:
            while chunk.lo + got < chunk.end:
                try:
                    n = os.preadv(self._fd, [view[got:want]], chunk.lo + got)  # releases the GIL
                except OSError as e:
                    if e.errno != errno.EINVAL or not _is_direct(self._fd):
                        raise
                    # The filesystem took O_DIRECT at open but refuses the read: read through the cache.
                    fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    continue
                if n == 0:
                    raise InputError(f"{self.path} was truncated while weightx read it; nothing was written:"
                                     " rerun once the file is complete")
                got += n
                if got % ALIGN and chunk.lo + got < chunk.end and _is_direct(self._fd):
                    fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        finally:
            view.release()
        return got


def _up(n: int) -> int:
    return n + (-n % ALIGN)


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _open(path: Path) -> int:
    """`open_regular`'s descriptor, switched to O_DIRECT where the filesystem takes it."""
    fd = open_regular(path)
    if direct_enabled():
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            pass  # no O_DIRECT here: ordinary reads
    return fd


def available() -> bool:
    """Whether this platform has O_DIRECT reads at all (Linux); elsewhere the engine maps its inputs."""
    return hasattr(os, "O_DIRECT") and direct_enabled()
