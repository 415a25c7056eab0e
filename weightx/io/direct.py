"""Sequential file writes that bypass the page cache (O_DIRECT) where the filesystem allows it.

A merge writes each output byte once and fsyncs it. Through the page cache that costs a kernel copy
into freshly allocated pages (about 0.6 ns per byte here), background writeback competing for the
same cores, and a long fsync at the end. With O_DIRECT the disk reads from one reused, page-aligned
staging buffer: measured on the 2-core machine, 1.3 GB took 0.1 s of CPU and 0.4 s of wall time
instead of 1.5 s and 1.9 s. Filesystems without O_DIRECT (tmpfs before Linux 6.6, some FUSE and
network mounts) and `WEIGHTX_DIRECT_IO=0` get ordinary buffered writes with the same bytes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from pathlib import Path

import numpy as np

ALIGN = 4096  # offsets, lengths and addresses of direct writes are multiples of this
CHUNK = 8 << 20  # staging size: one disk write


def direct_enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("WEIGHTX_DIRECT_IO", "1").strip().lower() not in ("0", "false", "no", "off")


class SequentialFile:
    """Write-only, front to back. `close()` makes the file exactly the bytes written, fsynced."""

    def __init__(self, path: Path, direct: bool | None = None):
        self.path = path
        self.written = 0
        self._fd = -1
        self._stage: mmap.mmap | None = None
        self._fill = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = direct_enabled() if direct is None else direct
        if self.direct:
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
        if not self.direct:
            self._fd = os.open(path, flags, 0o644)
        else:
            self._stage = mmap.mmap(-1, CHUNK)  # anonymous maps are page-aligned
            self._view = memoryview(self._stage)
            self._to = np.frombuffer(self._view, dtype=np.uint8).ctypes.data

    def write(self, data: memoryview | bytes) -> None:
        data = memoryview(data).cast("B")
        self.written += data.nbytes
        if not self.direct:
            self._write_all(data)
            return
        if self._stage is None:
            raise ValueError(f"{self.path}: write after close")  # the copy below would hit unmapped memory
        pos, src = 0, np.frombuffer(data, dtype=np.uint8).ctypes.data if data.nbytes else 0
        while pos < data.nbytes:
            n = min(CHUNK - self._fill, data.nbytes - pos)
            # A foreign call, so the copy holds no GIL (a slice assignment held it for 2 s of a 7B run).
            ctypes.memmove(self._to + self._fill, src + pos, n)
            self._fill += n
            pos += n
            if self._fill == CHUNK:
                self._flush_stage(CHUNK)

    def _flush_stage(self, length: int) -> None:
        self._write_all(self._view[:length])
        self._fill = 0

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            try:
                n = os.write(self._fd, view)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self._buffered()  # the filesystem took the open but refuses direct writes
                continue
            view = view[n:]
            if view.nbytes and self.direct and n % ALIGN:
                self._buffered()  # a short write left the offset unaligned

    def _buffered(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self) -> None:
        try:
            if self._fill:
                tail = self._fill
                if self.direct:  # pad the last block to the alignment, then cut the file back
                    pad = -tail % ALIGN
                    self._view[tail:tail + pad] = bytes(pad)
                    tail += pad
                self._flush_stage(tail)
                os.ftruncate(self._fd, self.written)
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._stage is not None:
            stage, self._stage = self._stage, None
            try:
                self._view.release()
                stage.close()
            except BufferError:
                pass  # a slice is still referenced (an error's traceback): freed with it

    @property
    def closed(self) -> bool:
        return self._fd < 0
