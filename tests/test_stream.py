"""O_DIRECT input streams (`weightx.io.stream`): the bytes the compute and the input hash get, the
failure paths, and whole runs that read through them against runs that map their inputs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import weightx
from weightx.errors import InputError
from weightx.io import stream
from weightx.io.provenance import _Running
from weightx.io.stream import DirectStream
from conftest import expo_recipe


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(stream, "CHUNK", 16 << 10)


def _file(tmp_path: Path, n: int = 300_001, seed: int = 0) -> tuple[Path, bytes]:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    return path, data


def _pieces(lo: int, hi: int, step: int) -> list[tuple[int, int, int]]:
    return [(i, a, min(a + step, hi)) for i, a in enumerate(range(lo, hi, step))]


def _consume(st: DirectStream, pieces, data: bytes, feed: bool = True) -> None:
    """What the engine does per block: view, compare, feed, release, in order."""
    for key, lo, hi in pieces:
        got = st.view(key, torch.uint8, hi - lo)
        assert got.numpy().tobytes() == data[lo:hi], key
        del got
        if feed:
            st.feed(key)
        st.release(key)


@pytest.mark.parametrize("buffers", [1, 3])
def test_pieces_read_back_and_feed_the_whole_file_hash(tmp_path, small_chunks, buffers):
    """Unaligned pieces over many chunks come back as the file's bytes; the hash fed from the stream
    (plus the header gap it reads itself) is the file's sha256. One buffer is enough not to hang."""
    path, data = _file(tmp_path)
    pieces = _pieces(123, len(data), 5_000)
    run = _Running(path)
    ended = []
    st = DirectStream(path, pieces, buffers, run.feed, lambda: ended.append(1))
    _consume(st, pieces, data)
    st.close()
    assert run.pos == len(data) and run.digest == hashlib.sha256(data).hexdigest()
    assert ended == [1]  # told once that feeding is over
    assert st._made <= buffers


def test_a_key_read_as_two_inputs_is_read_once_and_released_twice(tmp_path, small_chunks):
    path, data = _file(tmp_path, 100_000)
    one = _pieces(0, len(data), 4_096)
    pieces = [p for p in one for _ in range(2)]  # each block asked for twice, as base and delta
    st = DirectStream(path, pieces, 1)
    for key, lo, hi in one:
        a = st.view(key, torch.uint8, hi - lo)
        b = st.view(key, torch.uint8, hi - lo)
        assert a.numpy().tobytes() == b.numpy().tobytes() == data[lo:hi]
        del a, b
        st.release(key)
        st.release(key)
    st.close()
    assert st._made == 1


def test_pieces_out_of_file_order_still_hash_the_file(tmp_path, small_chunks):
    """Blocks read back to front: the hash reads what it has not been given and skips what it has."""
    path, data = _file(tmp_path, 120_000)
    pieces = list(reversed(_pieces(0, len(data), 7_000)))
    run = _Running(path)
    st = DirectStream(path, pieces, 2, run.feed)
    _consume(st, pieces, data)
    st.close()
    run.advance(None)  # what the file's hash thread does once the stream is done
    assert run.digest == hashlib.sha256(data).hexdigest()


def test_a_truncated_file_is_one_clear_error(tmp_path, small_chunks):
    path, data = _file(tmp_path, 50_000)
    pieces = _pieces(0, 80_000, 10_000)  # planned from a header that promised more
    st = DirectStream(path, pieces, 2)
    with pytest.raises(InputError, match="was truncated while weightx read it"):
        for key, lo, hi in pieces:
            st.view(key, torch.uint8, hi - lo)
            st.release(key)
    st.close()


def test_a_failing_hash_stops_the_stream(tmp_path, small_chunks):
    path, data = _file(tmp_path, 100_000)
    pieces = _pieces(0, len(data), 8_192)

    def broken(at: int, view: memoryview) -> None:
        raise OSError("disk gone")

    st = DirectStream(path, pieces, 2, broken)
    with pytest.raises(OSError, match="disk gone"):
        for key, lo, hi in pieces:
            st.view(key, torch.uint8, hi - lo)
            st.feed(key)
            st.release(key)
    st.close()


def test_close_stops_a_reader_waiting_for_a_buffer(tmp_path, small_chunks):
    path, data = _file(tmp_path, 200_000)
    pieces = _pieces(0, len(data), 16_384)
    st = DirectStream(path, pieces, 1)
    key, lo, hi = pieces[0]
    st.view(key, torch.uint8, hi - lo)  # holds the only buffer: the readers wait
    t0 = time.monotonic()
    st.close()
    assert time.monotonic() - t0 < 5
    assert not any(t.is_alive() for t in st._threads)
    with pytest.raises(RuntimeError, match="close"):
        st.view(pieces[5][0], torch.uint8, 10)


def test_a_filesystem_refusing_direct_reads_gets_buffered_ones(tmp_path, small_chunks, monkeypatch):
    """O_DIRECT taken at open but the read refused (EINVAL): the same bytes through the cache."""
    path, data = _file(tmp_path, 90_000)
    real = os.preadv
    refused = []

    def preadv(fd, bufs, offset):
        import fcntl

        mine = os.readlink(f"/proc/self/fd/{fd}") == str(path.resolve())  # not another test's leftover reader
        if mine and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    pieces = _pieces(10, len(data), 9_000)
    st = DirectStream(path, pieces, 2)
    _consume(st, pieces, data, feed=False)
    st.close()
    if stream.available():
        assert refused  # the direct read was tried, then dropped


# ---- whole runs ---------------------------------------------------------------------------------


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _input_hashes_are_the_files(out: Path, models: dict[str, Path]) -> None:
    doc = json.loads((out / "weightx.json").read_text())
    for alias, folder in models.items():
        files = doc["inputs"][alias]["files"]
        assert files, alias
        for shard, rec in files.items():
            assert rec["sha256"] == hashlib.sha256((folder / shard).read_bytes()).hexdigest(), (alias, shard)


@pytest.fixture(autouse=True)
def small_blocks(request, monkeypatch):
    """Whole runs compute 1000-element blocks: several per tensor, several per chunk."""
    import functools

    from weightx.pipeline import engine, run

    monkeypatch.setattr(run, "write_shards", functools.partial(engine.write_shards, block=1000))


@pytest.fixture
def counted_views(monkeypatch):
    seen: list[str] = []
    real = DirectStream.view

    def view(self, key, dtype, count):
        seen.append(key[0])
        return real(self, key, dtype, count)

    monkeypatch.setattr(DirectStream, "view", view)
    return seen


@pytest.mark.skipif(not stream.available(), reason="no O_DIRECT on this platform")
def test_streamed_run_writes_the_mapped_runs_bytes_and_hashes(family, tmp_path, monkeypatch, counted_views):
    """One-pass tensors read through the streams (small chunks, several per tensor) give the bytes
    of a run that maps its inputs (WEIGHTX_DIRECT_IO=0), and the recorded input hashes are the files'."""
    monkeypatch.setenv("WEIGHTX_FUSED", "1")
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache-a"))
    monkeypatch.setattr(stream, "CHUNK", 8 << 10)
    reread: list[int] = []
    real = _Running._advance

    def advance(self, end, stop=None):
        reread.append(max(0, end - self.pos))
        real(self, end, stop)

    monkeypatch.setattr(_Running, "_advance", advance)
    a = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "a", 0.3)).path
    assert counted_views  # the streams served the compute
    _input_hashes_are_the_files(a, {"sft": family["sft"], "dpo": family["dpo"]})
    # ... and fed the hashes: these read only the files' headers themselves
    total = sum(f.stat().st_size for m in ("sft", "dpo") for f in family[m].glob("*.safetensors"))
    assert sum(reread) < 0.05 * total
    monkeypatch.setenv("WEIGHTX_DIRECT_IO", "0")
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache-b"))
    counted_views.clear()
    b = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "b", 0.3)).path
    assert not counted_views
    assert _shards(a) == _shards(b)


def _write_reversed(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file whose data is laid out in reverse name order (save_file sorts it)."""
    header, blobs, at = {}, [], 0
    for name in sorted(tensors, reverse=True):
        raw = tensors[name].contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.mark.skipif(not stream.available(), reason="no O_DIRECT on this platform")
def test_inputs_laid_out_against_the_engines_order_hash_right(family, tmp_path, monkeypatch, counted_views):
    """The engine reads in the output's order; an input whose file holds its tensors the other way
    round is still hashed right (the hash reads ahead itself and skips what it had), with the same bytes."""
    from safetensors.torch import load_file

    monkeypatch.setenv("WEIGHTX_FUSED", "1")
    monkeypatch.setattr(stream, "CHUNK", 8 << 10)
    models = {}
    for alias in ("sft", "dpo"):
        folder = tmp_path / alias
        folder.mkdir()
        for f in family[alias].iterdir():
            if f.suffix == ".safetensors":
                _write_reversed(folder / f.name, load_file(str(f)))
            else:
                (folder / f.name).write_bytes(f.read_bytes())
        models[alias] = folder
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    out = weightx.apply(expo_recipe(models["sft"], models["dpo"], tmp_path / "out", 0.3)).path
    assert counted_views
    _input_hashes_are_the_files(out, models)
    monkeypatch.setenv("WEIGHTX_DIRECT_IO", "0")
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache-b"))
    ref = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "ref", 0.3)).path
    assert _shards(out) == _shards(ref)


@pytest.mark.skipif(not stream.available(), reason="no O_DIRECT on this platform")
def test_one_folder_as_base_and_delta_streams_once_per_block(family, tmp_path, monkeypatch, counted_views):
    """The same files read as two inputs: each block is read once, released twice, and the output
    is the base itself (a zero delta)."""
    monkeypatch.setenv("WEIGHTX_FUSED", "1")
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    doc = {"models": {"a": str(family["sft"]), "b": str(family["sft"])}, "base": "a",
           "deltas": [{"model": "b", "edits": [{"expo": {"alpha": 0.5}}]}], "output": {"path": str(tmp_path / "out")}}
    out = weightx.apply(doc).path
    assert counted_views
    from weightx.testing import load_state_dict

    got, want = load_state_dict(out), load_state_dict(family["sft"])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    _input_hashes_are_the_files(out, {"a": family["sft"]})


@pytest.mark.skipif(not stream.available(), reason="no O_DIRECT on this platform")
def test_a_run_failing_mid_stream_stops_its_readers(family, tmp_path, monkeypatch):
    """A compute error half-way: the run fails with it, nothing is left as the output, and no
    reader thread is left behind."""
    from weightx.kernels import fused

    monkeypatch.setenv("WEIGHTX_FUSED", "1")
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stream, "CHUNK", 8 << 10)
    real, calls = fused.linear_bf16, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("injected compute failure")
        return real(*args, **kw)

    monkeypatch.setattr(fused, "linear_bf16", failing)
    before = set(threading.enumerate())
    with pytest.raises(Exception, match="injected compute failure"):
        weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3))
    assert not (tmp_path / "out").exists()
    time.sleep(0.2)
    assert not [t for t in set(threading.enumerate()) - before if t.name == "weightx-read" and t.is_alive()]
