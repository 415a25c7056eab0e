"""Input hashing beside the engine's reads (issue 19): paced hashes are the true sha256, stay within
their lookahead of the reads, hold the engine back when they fall behind, never hang it, and leave
every output byte as the plain path writes it."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

import weightx
from weightx.io import provenance
from weightx.io.provenance import Hasher, Pacer
from weightx.pipeline.compute import pick_device
from weightx.pipeline.engine import write_shards
from weightx.pipeline.planner import build_plan
from weightx.recipe.model import load_recipe
from conftest import expo_recipe, run_cli

KB = 1024


@pytest.fixture
def small_pacing(monkeypatch):
    """Pacing windows in KB instead of MB/GB, so a few small files exercise them."""
    monkeypatch.setattr(provenance._Running, "BUFFER", 4 * KB)
    monkeypatch.setattr(Pacer, "LOOKAHEAD", 16 * KB)
    monkeypatch.setattr(Pacer, "LAG", 64 * KB)


def _files(tmp_path: Path, sizes: list[int]) -> list[Path]:
    out = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"in{i}.bin"
        p.write_bytes(os.urandom(n))
        out.append(p)
    return out


def test_paced_hashes_are_the_sha256_and_follow_the_reads(tmp_path, small_pacing, monkeypatch):
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    files = _files(tmp_path, [300 * KB, 130 * KB + 7])
    pacer = Pacer()
    seen: list[tuple[str, int, int]] = []  # (file, hashed position, engine front) at every step
    real = provenance._Running.advance

    def watch(self, limit, stop=None):
        done = real(self, limit, stop)
        seen.append((str(self.path), self.pos, pacer._front.get(str(self.path), 0), pacer._released))
        return done

    monkeypatch.setattr(provenance._Running, "advance", watch)
    hasher = Hasher(files, pacer)
    time.sleep(0.2)
    assert seen == []  # nothing is hashed before the engine starts on a file
    for end in range(8 * KB, 300 * KB + 1, 8 * KB):  # the engine reads both files side by side
        pacer.reading(files[0], end)
        pacer.reading(files[1], min(end, 130 * KB))
        time.sleep(0.002)
    pacer.release()
    got = hasher.result()
    assert got == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    paced = [(f, pos, front) for f, pos, front, released in seen if not released]
    assert paced, "the hashes ran before the release"
    assert all(pos <= front + Pacer.LOOKAHEAD for _, pos, front in paced)
    # Cached for the next run: nothing is hashed again.
    seen.clear()
    assert Hasher(files, Pacer()).result() == got and seen == []


def test_the_engine_waits_for_a_hash_that_fell_behind(tmp_path, small_pacing, monkeypatch):
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    (f,) = _files(tmp_path, [512 * KB])
    gate = threading.Event()
    real = provenance._Running.advance

    def slow(self, limit, stop=None):
        gate.wait()
        return real(self, limit, stop)

    monkeypatch.setattr(provenance._Running, "advance", slow)
    pacer = Pacer()
    hasher = Hasher([f], pacer)
    pacer.reading(f, 32 * KB)  # within LAG of a hash at 0: no wait
    t = threading.Thread(target=pacer.reading, args=(f, 256 * KB))
    t.start()
    t.join(0.3)
    assert t.is_alive(), "the engine ran more than LAG ahead of the hash"
    gate.set()
    t.join(10)
    assert not t.is_alive()
    pacer.release()
    assert hasher.result()[str(f)] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_a_failing_hash_never_blocks_the_engine(tmp_path, small_pacing, monkeypatch):
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    (f,) = _files(tmp_path, [512 * KB])

    def broken(self, limit, stop=None):
        raise OSError(f"{self.path}: read error")

    monkeypatch.setattr(provenance._Running, "advance", broken)
    pacer = Pacer()
    hasher = Hasher([f], pacer)
    pacer.reading(f, 8 * KB)
    t = threading.Thread(target=pacer.reading, args=(f, 500 * KB))
    t.start()
    t.join(10)
    assert not t.is_alive(), "the engine waits for a hash that failed"
    pacer.release()
    with pytest.raises(OSError, match="read error"):
        hasher.result()


def test_files_the_engine_never_reads_are_hashed_after_the_release(tmp_path, small_pacing, monkeypatch):
    """A resumed run's adopted shards, or a file only another rank reads: no read ever comes."""
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    files = _files(tmp_path, [40 * KB, 70 * KB])
    pacer = Pacer()
    hasher = Hasher(files, pacer)
    pacer.release()
    assert hasher.result() == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_prehash_starts_early_and_the_paced_run_goes_on_from_there(family, tmp_path, monkeypatch):
    """`weightx apply` starts hashing before it imports torch; the run's Hasher takes over each
    file's hash where the early thread stopped (none is hashed from the start twice)."""
    import yaml

    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(provenance, "_inflight", {})
    starts: list[str] = []
    real = provenance._Running.__init__

    def init(self, path):
        real(self, path)
        starts.append(str(path))

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"models": {"sft": str(family["sft"]), "dpo": "dpo"}}))
    (tmp_path / "dpo").symlink_to(family["dpo"], target_is_directory=True)  # relative to the recipe
    provenance.prehash_recipe(recipe)
    files = sorted(family["sft"].glob("*.safetensors")) + sorted((tmp_path / "dpo").glob("*.safetensors"))
    assert files and len(provenance._inflight) == len(files)
    early = dict(provenance._inflight)
    monkeypatch.setattr(provenance._Running, "__init__", init)
    pacer = Pacer()
    hasher = Hasher(files, pacer)
    pacer.release()
    got = hasher.result()
    assert got == {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert provenance._inflight == {}  # every early state was adopted, none was left behind
    # The states the run finished are the early ones: each file had one running hash.
    assert all(r.digest == got[str(r.path)] for r in early.values())


def test_prehash_ignores_what_it_cannot_use(tmp_path, monkeypatch):
    """Best effort before validation: a missing file, a non-mapping, an alias bomb (composed, never
    expanded) or a Hub id start nothing and raise nothing; the real loader reports errors later."""
    monkeypatch.setattr(provenance, "_inflight", {})
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    cases = {"missing": None, "list.yaml": "- 1\n- 2\n", "bomb.yaml": bomb + "models: *i\n",
             "hub.yaml": "models: {a: org/name@main, b: [1, 2]}\n", "bad.yaml": "models: {a: [\n"}
    t = time.perf_counter()
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        provenance.prehash_recipe(tmp_path / name)
    assert time.perf_counter() - t < 2.0
    assert provenance._inflight == {}


def test_a_run_records_the_true_input_hashes(family, tmp_path, small_pacing, monkeypatch):
    """The whole path: a first run (empty hash cache) with tiny pacing windows records the sha256 of
    every input shard, computed beside the reads."""
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    res = weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3))
    doc = json.loads((res.path / "weightx.json").read_text())
    for alias in ("sft", "dpo"):
        for name, info in doc["inputs"][alias]["files"].items():
            assert info["sha256"] == hashlib.sha256((family[alias] / name).read_bytes()).hexdigest()


@pytest.mark.parametrize("workers", [1, 2])
def test_paced_block_sized_run_writes_the_plain_paths_bytes(family, tmp_path, small_pacing, monkeypatch, workers):
    """Pacing, the block size and the worker count change when things happen, never a byte: the
    default run equals one whole-tensor block on one thread with no pacer."""
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    plan = build_plan(load_recipe(expo_recipe(family["sft"], family["dpo"], tmp_path / "unused", 0.3)))
    plain, paced = tmp_path / "plain", tmp_path / "paced"
    plain.mkdir(), paced.mkdir()
    write_shards(plan, plain, pick_device("cpu"), block=1 << 30, workers=1)
    files = sorted({h.path for s in [plan.base] + [src for _, src in plan.deltas] for h in s.headers.values()})
    pacer = Pacer()
    hasher = Hasher(files, pacer)
    try:
        write_shards(plan, paced, pick_device("cpu"), workers=workers, pacer=pacer)
    finally:
        pacer.release()
    hasher.result()
    for shard in plan.shards:
        assert (paced / shard.filename).read_bytes() == (plain / shard.filename).read_bytes()


def test_benchmark_no_hash_outputs_never_pass_verify(family, tmp_path):
    """WEIGHTX_BENCH_NO_HASH (the benchmark's price-of-provenance contender) records no sha256 at
    all, so such an output can never pass for a verified one."""
    env = {**os.environ, "WEIGHTX_BENCH_NO_HASH": "1", "WEIGHTX_CACHE": str(tmp_path / "cache")}
    r = run_cli("apply", str(_write(tmp_path, expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3))), env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "out" / "weightx.json").read_text())
    assert all(e["sha256"] is None for e in doc["output"]["shards"])
    assert all(i["sha256"] is None for src in doc["inputs"].values() for i in src["files"].values())
    v = run_cli("verify", str(tmp_path / "out"))
    assert v.returncode != 0 and "no sha256" in v.stdout + v.stderr
    assert not (tmp_path / "cache" / "sha256.json").exists()


def _write(tmp_path: Path, doc: dict) -> Path:
    import yaml

    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p



def test_the_hash_cache_forgets_files_that_are_gone(tmp_path, monkeypatch):
    """The cache is read at every run's start: entries of deleted files do not pile up in it."""
    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    files = _files(tmp_path, [1000, 2000])
    Hasher(files).result()
    assert len(json.loads(provenance.cache_path().read_text())) == 2
    files[0].unlink()
    (tmp_path / "more").mkdir()
    (g,) = _files(tmp_path / "more", [3000])
    Hasher([g]).result()
    keys = json.loads(provenance.cache_path().read_text())
    assert len(keys) == 2 and not any(k.startswith(str(files[0]) + "|") for k in keys)


@pytest.mark.parametrize("stops", [[None], [1, 700 * KB, 1 << 20, (1 << 20) + 1, None], [5 * KB, 3 << 20, None]])
def test_stepwise_hash_through_the_buffer_is_the_file_sha256(tmp_path, monkeypatch, stops):
    """Hashed in pieces of the 1 MB buffer (shrunk here to 64 KB), stopping anywhere: the file's sha256."""
    monkeypatch.setattr(provenance._Running, "BUFFER", 64 * KB)
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom((2 << 20) + 12345))
    run = provenance._Running(p)
    for limit in stops:
        done = run.advance(limit)
        assert run.pos == (p.stat().st_size if limit is None else min(limit, p.stat().st_size))
        assert done == (limit is None or limit >= p.stat().st_size)
    assert run.digest == hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_file_that_shrinks_between_steps_is_an_error_not_a_wrong_hash(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(3 << 20))
    run = provenance._Running(p)
    run.advance(1 << 20)
    os.truncate(p, 2 << 20)
    with pytest.raises(OSError, match="changed size"):
        run.advance(None)
    assert run.digest is None


def test_a_file_truncated_under_a_step_is_an_error_not_a_wrong_hash(tmp_path, monkeypatch):
    """The size is checked when a step opens the file; pread then meets the end early."""
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(3 << 20))
    run = provenance._Running(p)
    real = os.preadv
    calls = []

    def shrinking(fd, bufs, pos):
        calls.append(pos)
        if len(calls) == 2:
            os.truncate(p, 1 << 20)
        return real(fd, bufs, pos)

    monkeypatch.setattr(provenance.os, "preadv", shrinking)
    with pytest.raises(OSError, match="truncated while weightx hashed it"):
        run.advance(None)
    assert run.digest is None
