"""sha256 of bulk data, fed from L2.

On a server core sha256 fed straight from DRAM, or from a buffer another core has just written,
stalls on its loads: 0.7-1.1 GB/s on an AVX-512 VM with SHA extensions, against 1.7 from L2, while
a copy streams at ~9 GB/s. So large buffers are copied through a 256 KB buffer that stays in this
core's L2 and hashed there: a 7B merge's 13.5 GB output hash went from 12.9 to 10.6 CPU-seconds
(alternating A/B; single runs before had measured up to 19.1).
The digests are hashlib's (it does the hashing). Input files get the same copy from pread into a
1 MB buffer (`io.provenance`; 256 KB reads there measured 1-2 s slower on the 7B run).
"""

from __future__ import annotations

import ctypes
import hashlib
import threading

import numpy as np

STAGE = 256 << 10
_local = threading.local()  # one stage per thread: a run with many shards open still has one


def _stage() -> np.ndarray:
    stage = getattr(_local, "stage", None)
    if stage is None:
        stage = _local.stage = np.empty(STAGE, dtype=np.uint8)
    return stage


def update_staged(h: "hashlib._Hash", data: bytes | bytearray | memoryview) -> None:
    """h.update(data), copying a buffer larger than STAGE through the calling thread's L2-sized
    buffer. The copies and the hashing hold no GIL."""
    view = memoryview(data).cast("B")
    if view.nbytes <= STAGE:
        h.update(view)  # a small buffer is hashed where it is (a pread buffer is in L2)
        return
    buf = _stage()
    stage, to = memoryview(buf), buf.ctypes.data
    src = np.frombuffer(view, dtype=np.uint8).ctypes.data  # read-only buffers too: only read
    for i in range(0, view.nbytes, STAGE):
        n = min(STAGE, view.nbytes - i)
        ctypes.memmove(to, src + i, n)  # a foreign call: releases the GIL
        h.update(stage[:n])  # releases the GIL


class Sha256:
    """`hashlib.sha256` whose `update` copies buffers larger than STAGE through an L2-sized buffer
    (the calling thread's). The copies and the hashing hold no GIL."""

    def __init__(self, data: bytes | bytearray | memoryview = b""):
        self._h = hashlib.sha256()
        if len(data):
            self.update(data)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        update_staged(self._h, data)

    def digest(self) -> bytes:
        return self._h.digest()

    def hexdigest(self) -> str:
        return self._h.hexdigest()
