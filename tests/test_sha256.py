"""weightx.kernels.sha256 against hashlib: every tail length, every split, paired streams, and the
hashlib fallback the same class runs where the CPU has no SHA extensions."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from weightx.kernels import sha256 as S

RNG = np.random.default_rng(20261207)
DATA = RNG.integers(0, 256, 3 * S.STAGE + 4099, dtype=np.uint8).tobytes()
LENGTHS = sorted({*range(0, 200), 255, 256, 257, 4095, 4096, 4097, S.STAGE - 1, S.STAGE, S.STAGE + 1,
                  S.STAGE + 63, 2 * S.STAGE + 64, len(DATA)})


@pytest.fixture(params=["native", "hashlib"])
def path(request, monkeypatch):
    if request.param == "native":
        if not S.native():
            pytest.skip("this CPU has no SHA extensions (or llvmlite can't JIT here)")
    else:
        monkeypatch.setattr(S, "_native", lambda: None)
    return request.param


def test_whole_buffers_match_hashlib(path):
    for n in LENGTHS:
        assert S.Sha256(DATA[:n]).hexdigest() == hashlib.sha256(DATA[:n]).hexdigest(), n


def test_any_split_matches_hashlib(path):
    for n in LENGTHS[::7] + [len(DATA)]:
        cuts = sorted(RNG.integers(0, n + 1, 6).tolist())
        h = S.Sha256()
        for a, b in zip([0] + cuts, cuts + [n]):
            h.update(memoryview(DATA)[a:b])
        assert h.hexdigest() == hashlib.sha256(DATA[:n]).hexdigest(), (n, cuts)


def test_digest_can_be_read_midway_and_hashing_goes_on(path):
    h = S.Sha256(DATA[:100])
    assert h.hexdigest() == hashlib.sha256(DATA[:100]).hexdigest()
    h.update(DATA[100:S.STAGE + 7])
    assert h.digest() == hashlib.sha256(DATA[:S.STAGE + 7]).digest()


def test_buffers_of_any_kind(path):
    arr = np.frombuffer(DATA, dtype=np.uint8)
    odd = arr[3:3 + 2 * S.STAGE + 5]  # not aligned, read-only, larger than the stage
    assert S.Sha256(memoryview(odd)).hexdigest() == hashlib.sha256(odd.tobytes()).hexdigest()
    words = np.frombuffer(DATA[:4096], dtype=np.uint32)  # multi-byte items are hashed as bytes
    assert S.Sha256(memoryview(words)).hexdigest() == hashlib.sha256(DATA[:4096]).hexdigest()
    assert S.Sha256(bytearray(DATA[:77])).hexdigest() == hashlib.sha256(DATA[:77]).hexdigest()


def test_pairs_match_two_hashlib_streams(path):
    for na, nb, pre_a, pre_b in [(0, 0, 0, 0), (64, 64, 0, 0), (S.STAGE, S.STAGE, 0, 0), (S.STAGE, 1000, 0, 0),
                                 (999, S.STAGE + 64, 0, 0), (S.STAGE, S.STAGE, 5, 0), (4096, 4096, 64, 128),
                                 (len(DATA) - 10, S.STAGE, 0, 3)]:
        x, y = S.Sha256(DATA[-pre_a:] if pre_a else b""), S.Sha256(DATA[:pre_b])
        a, b = memoryview(DATA)[:na], memoryview(DATA)[7:7 + nb]
        S.update_pair(x, a, y, b)
        S.update_pair(x, a[:100], y, b[:33])
        assert x.hexdigest() == hashlib.sha256((DATA[-pre_a:] if pre_a else b"") + bytes(a) + bytes(a[:100])).hexdigest()
        assert y.hexdigest() == hashlib.sha256(DATA[:pre_b] + bytes(b) + bytes(b[:33])).hexdigest()


def test_the_switch_turns_the_kernel_off():
    code = "from weightx.kernels import sha256 as S; print(S.native(), S.Sha256(b'abc').hexdigest())"
    out = subprocess.run([sys.executable, "-c", code], env={"WEIGHTX_SHA_NI": "0", "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", hashlib.sha256(b"abc").hexdigest()]


def test_small_files_stay_on_hashlib_and_large_ones_take_the_kernel(tmp_path):
    """The kernel's compile (~60 ms, ~7 MB) is paid only by a process that hashes a large file."""
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(DATA[:5000])
    with open(large, "wb") as f:
        f.truncate(S.NATIVE_MIN + 3)  # sparse: zeros
    code = ("import sys; from weightx.io.provenance import sha256_file; from pathlib import Path\n"
            "a = sha256_file(Path(sys.argv[1])); loaded = 'llvmlite.binding' in sys.modules\n"
            "b = sha256_file(Path(sys.argv[2])); print(a, loaded, b, 'llvmlite.binding' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(small), str(large)], capture_output=True, text=True,
                         check=True).stdout.split()
    zeros = hashlib.sha256(bytes(S.NATIVE_MIN + 3)).hexdigest()
    assert out == [hashlib.sha256(DATA[:5000]).hexdigest(), "False", zeros, str(S.native())]
