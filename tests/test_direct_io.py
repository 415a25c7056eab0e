"""Direct (O_DIRECT) shard writes: the file holds exactly the bytes written, on every path out."""

from __future__ import annotations

import errno
import os

import pytest

from weightx.io import direct as direct_io
from weightx.io.direct import ALIGN, CHUNK, SequentialFile

SIZES = [[], [1], [ALIGN - 1], [ALIGN], [CHUNK], [CHUNK + 1], [3, CHUNK - 3, 5], [ALIGN + 7] * 3 + [2 * CHUNK + 11]]


def _write(path, sizes, seed=0, **kw):
    rng = __import__("random").Random(seed)
    expect = bytearray()
    f = SequentialFile(path, **kw)
    for n in sizes:
        block = rng.randbytes(n)
        f.write(memoryview(block))
        expect += block
    mode = f.direct
    f.close()
    return bytes(expect), mode


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "+".join(map(str, s)) or "empty")
def test_bytes_round_trip(tmp_path, direct, sizes):
    path = tmp_path / "f.bin"
    expect, _ = _write(path, sizes, direct=direct)
    assert path.read_bytes() == expect
    assert path.stat().st_size == len(expect)


def test_direct_is_used_where_the_filesystem_takes_it(tmp_path):
    f = SequentialFile(tmp_path / "probe", direct=True)
    took = f.direct
    f.close()
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    try:
        fd = os.open(tmp_path / "probe2", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        os.close(fd)
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert took


def test_env_switch_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTX_DIRECT_IO", "0")
    f = SequentialFile(tmp_path / "a")
    assert not f.direct
    f.close()


def test_open_refused_falls_back_to_buffered(tmp_path, monkeypatch):
    real = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *a)

    monkeypatch.setattr(direct_io.os, "open", no_direct)
    expect, mode = _write(tmp_path / "a", [CHUNK + 5, 9], direct=True)
    assert mode is False
    assert (tmp_path / "a").read_bytes() == expect


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT")
def test_write_refused_midway_falls_back_with_the_same_bytes(tmp_path, monkeypatch):
    real, calls = os.write, []

    def flaky(fd, data):
        calls.append(len(data))
        if len(calls) == 2:  # the filesystem accepted the open but refuses the second direct write
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(direct_io.os, "write", flaky)
    f = SequentialFile(tmp_path / "a", direct=True)
    if not f.direct:
        f.close()
        pytest.skip("this filesystem refuses O_DIRECT")
    f.close()
    expect, mode = _write(tmp_path / "a", [CHUNK, CHUNK, CHUNK // 2 + 3], direct=True)
    assert mode is False
    assert (tmp_path / "a").read_bytes() == expect


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT")
def test_short_unaligned_write_finishes_buffered(tmp_path, monkeypatch):
    real = os.write
    state = {"short": False}

    def short(fd, data):
        if not state["short"] and len(data) > ALIGN:
            state["short"] = True
            return real(fd, data[: ALIGN * 3])  # aligned short write: still direct
        return real(fd, data)

    monkeypatch.setattr(direct_io.os, "write", short)
    expect, _ = _write(tmp_path / "a", [CHUNK + 100], direct=True)
    assert (tmp_path / "a").read_bytes() == expect

    state["short"] = False

    def odd(fd, data):  # a short write of 100 bytes (the kernel dropped O_DIRECT for it)
        if not state["short"] and len(data) > ALIGN:
            state["short"] = True
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            return real(fd, data[:100])
        return real(fd, data)

    monkeypatch.setattr(direct_io.os, "write", odd)
    f = SequentialFile(tmp_path / "b", direct=True)
    expect = os.urandom(2 * CHUNK + 1)
    f.write(expect)
    assert state["short"] and not f.direct
    f.close()
    assert (tmp_path / "b").read_bytes() == expect


def test_failed_write_raises_and_abort_releases(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "write", full)
    f = SequentialFile(tmp_path / "a")
    with pytest.raises(OSError) as e:
        f.write(bytes(CHUNK))  # the first full chunk goes to disk (or straight through, buffered)
        f.close()
    assert e.value.errno == errno.ENOSPC
    f.abort()
    assert f.closed


@pytest.mark.parametrize("direct", [True, False])
def test_write_after_close_raises_without_touching_the_stage(tmp_path, direct):
    """The stage copy is a raw memmove: after close it must refuse, not write into unmapped memory."""
    f = SequentialFile(tmp_path / "a", direct=direct)
    f.write(b"x" * 100)
    f.close()
    with pytest.raises((ValueError, OSError)):
        f.write(b"y" * 100)
    assert (tmp_path / "a").read_bytes() == b"x" * 100
