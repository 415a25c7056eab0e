"""weightx.io.sha256: hashlib's digests for every length and split, with large buffers hashed
through the L2 stage (the 7B output hash's 12.9 → 10.6 CPU-seconds rest on that copy)."""

from __future__ import annotations

import hashlib

import numpy as np

from weightx.io import sha256 as S

RNG = np.random.default_rng(20261207)
DATA = RNG.integers(0, 256, 3 * S.STAGE + 4099, dtype=np.uint8).tobytes()
LENGTHS = sorted({*range(0, 130), 4095, 4096, 4097, S.STAGE - 1, S.STAGE, S.STAGE + 1, S.STAGE + 63,
                  2 * S.STAGE + 64, len(DATA)})


def test_whole_buffers_match_hashlib():
    for n in LENGTHS:
        assert S.Sha256(DATA[:n]).hexdigest() == hashlib.sha256(DATA[:n]).hexdigest(), n


def test_any_split_matches_hashlib():
    for n in LENGTHS[::5] + [len(DATA)]:
        cuts = sorted(RNG.integers(0, n + 1, 6).tolist())
        h = S.Sha256()
        for a, b in zip([0] + cuts, cuts + [n]):
            h.update(memoryview(DATA)[a:b])
        assert h.digest() == hashlib.sha256(DATA[:n]).digest(), (n, cuts)


def test_buffers_of_any_kind():
    arr = np.frombuffer(DATA, dtype=np.uint8)
    odd = arr[3:3 + 2 * S.STAGE + 5]  # unaligned, read-only, larger than the stage
    assert S.Sha256(memoryview(odd)).hexdigest() == hashlib.sha256(odd.tobytes()).hexdigest()
    words = np.frombuffer(DATA[:3 * S.STAGE], dtype=np.uint32)  # multi-byte items are hashed as bytes
    assert S.Sha256(memoryview(words)).hexdigest() == hashlib.sha256(DATA[:3 * S.STAGE]).hexdigest()
    assert S.Sha256(bytearray(DATA[:77])).hexdigest() == hashlib.sha256(DATA[:77]).hexdigest()


def test_large_buffers_go_through_the_stage_and_small_ones_do_not(monkeypatch):
    copies: list[int] = []
    real = S.ctypes.memmove

    def counted(dst, src, n):
        copies.append(n)
        return real(dst, src, n)

    monkeypatch.setattr(S.ctypes, "memmove", counted)
    h = S.Sha256(DATA[:S.STAGE])
    assert copies == []  # a pread buffer is hashed where it is
    h.update(DATA[:3 * S.STAGE + 5])
    assert copies == [S.STAGE] * 3 + [5]
    assert h.hexdigest() == hashlib.sha256(DATA[:S.STAGE] + DATA[:3 * S.STAGE + 5]).hexdigest()


def test_hashes_on_several_threads_at_once_keep_their_own_stage():
    """The stage is per thread: two shards hashed side by side must not share it."""
    import threading

    parts = [DATA[i:] for i in range(4)]
    out: dict[int, str] = {}

    def run(i: int) -> None:
        h = S.Sha256()
        for _ in range(20):
            h.update(parts[i])
        out[i] = h.hexdigest()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {i: hashlib.sha256(parts[i] * 20).hexdigest() for i in range(4)}
