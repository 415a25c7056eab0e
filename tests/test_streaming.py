"""Streamed non-elementwise steps (TIES, magnitude, DARE rescale: l1): tensor-wide statistics from
pre-passes over blocks, then per-block application. The whole-tensor path is the reference: the
blocked results must equal it bit for bit, whatever the block size (tie runs split across blocks
included) and the order the blocks are computed in; and a TIES apply's peak memory must not grow
with the largest tensor."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from weightx.combine.ties import Ties
from weightx.edits.base import TensorContext
from weightx.edits.dare import Dare
from weightx.edits.magnitude import Magnitude
from weightx.pipeline.compute import TensorComputer
from weightx.pipeline.engine import write_shards
from weightx.pipeline.planner import build_plan
from weightx.recipe.model import load_recipe
from weightx.kernels.topk import keep_count, select_blocks, threshold_bits

N = 300_000
NAME = "model.layers.0.mlp.up_proj.weight"


def bf16_deltas(m: int, seed: int = 0, n: int = N) -> list[torch.Tensor]:
    """Differences of bf16 weights, as the engine sees them: few distinct magnitudes, long tie runs,
    some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).mul_(0.02).to(torch.bfloat16).float()
    out = []
    for _ in range(m):
        tuned = (base + torch.randn(n, generator=g).mul_(0.002)).to(torch.bfloat16).float()
        d = tuned - base
        d[torch.rand(n, generator=g) < 0.05] = 0.0
        out.append(d)
    return out


def ranges(n: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(block, n - s)) for s in range(0, n, block)]


def streamed(xs: list[torch.Tensor], block: int, prepare, apply) -> torch.Tensor:
    """prepare(blocks) → state; apply(block list, start, state) → block; blocks applied last first."""
    n = xs[0].numel()
    rs = ranges(n, block)

    def blocks():
        for s, c in rs:
            yield s, [x[s : s + c].clone() for x in xs]

    state = prepare(blocks)
    out = torch.empty(n)
    for s, c in reversed(rs):
        out[s : s + c] = apply([x[s : s + c].clone() for x in xs], s, state)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.int32), b.reshape(-1).view(torch.int32))


# Block sizes that cut the tie runs anywhere, and the engine's (a multiple of every chunk size).
BLOCKS = (1000, 4096, 77_777, 1 << 17, N)


@pytest.mark.slow
@pytest.mark.parametrize("gathers", ["numpy", "torch"])
@pytest.mark.parametrize("members", ["kept", "over budget: counted again"])
@pytest.mark.parametrize("density", [0.5, 0.1, 0.013, 0.9])
def test_select_blocks_equals_the_whole_tensor_threshold(density, members, gathers, monkeypatch):
    """(v, r, e) as on the whole tensor, and each block's count of ties at v (and of those before
    it), whether taken from the threshold bucket's kept members or from a pass of their own, with
    the CPU compares and gathers in numpy or in torch (the CUDA code path)."""
    import weightx.kernels.topk as topk

    monkeypatch.setattr(topk, "NUMPY_ON_CPU", gathers == "numpy")
    if members != "kept":
        monkeypatch.setattr(topk, "MEMBER_BYTES", 0)
    xs = bf16_deltas(2, seed=1)
    for x in xs:
        k = keep_count(density, N)
        v, r, e = threshold_bits(x.clone(), k)
        at_v = x.view(torch.int32).bitwise_and(0x7FFFFFFF) == v
        for block in BLOCKS:
            sel = select_blocks(lambda: ((s, [x[s : s + c]]) for s, c in ranges(N, block)), N, [k])[0]
            assert (sel.v, sel.r, sel.e) == (v, r, e)
            if sel.partial:
                assert sel.within == {s: int(at_v[s : s + c].sum()) for s, c in ranges(N, block)}
                assert sel.before == {s: int(at_v[:s].sum()) for s, c in ranges(N, block)}


@pytest.mark.slow
@pytest.mark.parametrize("zero_sign", ["positive", "majority"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("density", [0.5, 0.07])
def test_streamed_ties_is_bit_identical_to_whole_tensor(zero_sign, normalize, density):
    xs = bf16_deltas(3, seed=2)
    weights = [0.75, 1.0, 1.25]
    cfg = Ties(density=density, zero_sign=zero_sign, normalize=normalize, scale=1.5)
    whole = cfg.combine([x.clone() for x in xs], weights, TensorContext(NAME, (N,)))
    for block in BLOCKS:
        got = streamed(
            xs, block,
            lambda blocks: cfg.prepare(blocks, weights, TensorContext(NAME, (N,))),
            lambda ds, s, st: cfg.combine(ds, weights, TensorContext(NAME, (N,), s, st)),
        )
        assert same_bits(got, whole), block


def test_majority_election_is_streamed():
    # Mostly negative deltas: with zero_sign majority a zero mass elects −, unlike positive.
    xs = [-x.abs() for x in bf16_deltas(2, seed=3)]
    xs[1][:1000] = -xs[0][:1000]  # exact cancellations: zero masses
    cfg = Ties(density=0.8, zero_sign="majority")
    ctx = TensorContext(NAME, (N,))
    st = cfg.prepare(lambda: ((s, [x[s : s + c].clone() for x in xs]) for s, c in ranges(N, 4096)), [1.0, 1.0], ctx)
    assert st.minus
    whole = cfg.combine([x.clone() for x in xs], [1.0, 1.0], ctx)
    got = streamed(xs, 4096, lambda b: st, lambda ds, s, _: cfg.combine(ds, [1.0, 1.0], TensorContext(NAME, (N,), s, st)))
    assert same_bits(got, whole)


@pytest.mark.slow
@pytest.mark.parametrize("rescale", ["none", "inverse_keep", "l1"])
@pytest.mark.parametrize("density", [0.3, 0.001])
def test_streamed_magnitude_is_bit_identical_to_whole_tensor(rescale, density):
    (x,) = bf16_deltas(1, seed=4)
    cfg = Magnitude(density=density, rescale=rescale)
    whole = cfg.apply(x.clone(), TensorContext(NAME, (N,)))
    # l1 folds 32K-element chunk sums in order: exact for blocks that are multiples of that.
    for block in BLOCKS if rescale != "l1" else (1 << 15, 1 << 17, 1 << 20):
        got = streamed(
            [x], block,
            lambda blocks: cfg.prepare(blocks, TensorContext(NAME, (N,))),
            lambda ds, s, st: cfg.apply(ds[0], TensorContext(NAME, (N,), s, st)),
        )
        assert same_bits(got, whole), block


@pytest.mark.parametrize("k", [0.0, 0.5])
def test_streamed_dare_l1_is_bit_identical_to_whole_tensor(k):
    (x,) = bf16_deltas(1, seed=5)
    cfg = Dare(drop=0.7, rescale="l1", k=k, seed=3)
    whole = cfg.apply(x.clone(), TensorContext(NAME, (N,)))
    for block in (1 << 17, 1 << 20):  # multiples of the 32K L1 chunk, as the engine's blocks are
        got = streamed(
            [x], block,
            lambda blocks: cfg.prepare(blocks, TensorContext(NAME, (N,))),
            lambda ds, s, st: cfg.apply(ds[0], TensorContext(NAME, (N,), s, st)),
        )
        assert same_bits(got, whole), block


def _read(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.slow
@pytest.mark.parametrize(
    "combine,edits",
    [
        ({"ties": {"density": 0.4, "zero_sign": "majority"}}, [[], []]),
        ({"ties": {"density": 0.4, "count": "reference", "elect": "unweighted", "divide": "count"}}, [[], []]),
        ("sum", [[{"magnitude": {"density": 0.3, "count": "reference"}}], [{"breadcrumbs": {"density": 0.5, "gamma": 0.1}}]]),
        ("sum", [[{"magnitude": {"density": 0.3, "rescale": "l1"}}], [{"dare": {"drop": 0.5, "rescale": "l1"}}]]),
        ({"ties": {"density": 0.5}}, [[{"dare": {"drop": 0.3, "rescale": "l1", "seed": 1}}], [{"magnitude": {"density": 0.7}}]]),
    ],
)
@pytest.mark.parametrize("cache", ["decoded once", "leading blocks decoded once", "re-read per pass"])
def test_engine_streams_and_equals_the_whole_tensor_path(merge_family, tmp_path, monkeypatch, combine, edits, cache):
    """Pre-passes on the block pool, over blocks decoded once (PASS_CACHE_BYTES) or re-read from
    the mappings each pass, give the bytes of the whole-tensor path."""
    import weightx.pipeline.compute as engine

    if cache == "re-read per pass":
        monkeypatch.setattr(engine, "PASS_CACHE_BYTES", 0)
    doc = {
        "models": {k: str(merge_family[k]) for k in ("base", "math", "code")},
        "base": "base",
        "deltas": [{"model": m, "weight": w, "edits": e} for m, w, e in zip(("math", "code"), (0.75, 1.25), edits)],
        "combine": combine,
        "output": {"path": str(tmp_path / "unused"), "dtype": "bfloat16"},
    }
    plan = build_plan(load_recipe(doc), tmp_path / "unused")
    big = max(plan.tensors, key=lambda t: t.numel)
    assert TensorComputer(plan, None, torch.device("cpu")).streams(big)
    blocks = ((1 << 15, 2), (1 << 20, 1), (1 << 16, 3))
    if cache == "leading blocks decoded once":  # about half the largest tensor's blocks fit
        blocks = ((1 << 10, 2), (1 << 11, 1), (3000, 3))
        monkeypatch.setattr(engine, "PASS_CACHE_BYTES", big.numel // 2 * 4 * 2)
    got = {}
    for block, workers in blocks:
        folder = tmp_path / f"b{block}w{workers}"
        folder.mkdir()
        write_shards(plan, folder, torch.device("cpu"), block=block, workers=workers)
        got[block] = _read(folder)
    # The slow reference: the same plan with every non-elementwise step on the whole tensor.
    monkeypatch.setattr(TensorComputer, "streams", lambda self, t: False)
    ref = tmp_path / "whole"
    ref.mkdir()
    write_shards(plan, ref, torch.device("cpu"))
    for block, files in got.items():
        assert files == _read(ref), block


def _peak_rss_anon(cmd: list[str], env: dict) -> int:
    """Run cmd, polling /proc/<pid>/status; the largest RssAnon seen, in bytes."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out.decode()
    return peak


def _ties_checkpoints(root: Path, n: int) -> Path:
    """base, sft, dpo with one n-element bf16 tensor (and a tiny one); returns a TIES recipe."""
    import safetensors.torch as st
    import yaml

    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).mul_(0.02).to(torch.bfloat16)
    for name in ("base", "sft", "dpo"):
        (root / name).mkdir(parents=True)
        x = base if name == "base" else (base.float() + torch.randn(n, generator=g).mul_(0.002)).to(torch.bfloat16)
        st.save_file({"model.embed_tokens.weight": x.view(-1, 5), "model.norm.weight": x[:5].clone()},
                     str(root / name / "model.safetensors"))
        del x
    recipe = root / "ties.yaml"
    recipe.write_text(yaml.safe_dump({
        "models": {k: str(root / k) for k in ("base", "sft", "dpo")},
        "base": "base",
        "deltas": [{"model": "sft"}, {"model": "dpo"}],
        "combine": {"ties": {"density": 0.5}},
        "output": {"path": str(root / "out"), "dtype": "bfloat16"},
    }))
    return recipe


def _ties_plan(merge_family, tmp_path):
    """A plain two-delta TIES plan over the small merge family (every tensor fits the pass cache)."""
    doc = {
        "models": {k: str(merge_family[k]) for k in ("base", "math", "code")},
        "base": "base",
        "deltas": [{"model": "math"}, {"model": "code"}],
        "combine": {"ties": {"density": 0.5}},
        "output": {"path": str(tmp_path / "unused"), "dtype": "bfloat16"},
    }
    return build_plan(load_recipe(doc), tmp_path / "unused")


def test_readonly_prepasses_read_the_decoded_blocks_without_copies(merge_family, tmp_path, monkeypatch):
    """TIES's threshold passes only read their blocks: they get the decoded (cached) deltas
    themselves, not per-pass copies; the mutating pre-passes (tested above) still get copies."""
    import weightx.pipeline.compute as engine
    import weightx.kernels.topk as topk

    plan = _ties_plan(merge_family, tmp_path)
    big = max(plan.tensors, key=lambda t: t.numel)
    comp = TensorComputer(plan, engine.Inputs(), torch.device("cpu"), block=1 << 10)
    seen = []
    original = topk.each_block

    def spy(blocks, fn, readonly=False):
        def wrapped(start, xs):
            seen.append((readonly, start, [x.data_ptr() for x in xs]))
            return fn(start, xs)
        return original(blocks, wrapped, readonly)

    monkeypatch.setattr(topk, "each_block", spy)
    comp.prepare(big)
    cached = comp._cache[big.name]
    assert len(cached) > 1 and seen and all(readonly for readonly, _, _ in seen)
    assert all(ptrs == [d.data_ptr() for d in cached[start]] for _, start, ptrs in seen)


def test_decoded_tensors_share_one_buffer_and_never_overlap(merge_family, tmp_path, monkeypatch):
    """The pass cache decodes tensor after tensor into one buffer (no fresh pages per tensor); a
    second tensor prepared while the first is still cached gets no cache rather than its storage."""
    import weightx.pipeline.compute as engine

    plan = _ties_plan(merge_family, tmp_path)
    a, b = sorted((t for t in plan.tensors if t.edit), key=lambda t: -t.numel)[:2]
    comp = TensorComputer(plan, engine.Inputs(), torch.device("cpu"), block=1 << 10)
    comp.prepare(a)
    first = comp._cache[a.name][0][0].data_ptr()
    comp.prepare(b)  # a is still cached: b must not be decoded into the same buffer
    assert b.name not in comp._cache and comp._cache[a.name][0][0].data_ptr() == first
    comp.release(a)
    comp.release(b)
    comp.prepare(b)
    assert comp._cache[b.name][0][0].data_ptr() == first  # reused, not reallocated
    comp.release(b)
    comp.release(b)
    # A tensor bigger than the budget caches its leading blocks only, in the same buffer (never
    # a second one: the arena is the budget), and reads the rest from the mappings.
    monkeypatch.setattr(engine, "PASS_CACHE_BYTES", 3 * (1 << 10) * 4 * 2 + 100)  # 3 blocks of 2 deltas
    comp.prepare(a)
    assert sorted(comp._cache[a.name]) == [0, 1 << 10, 2 << 10]
    assert comp._cache[a.name][0][0].data_ptr() == first
    monkeypatch.setattr(engine, "PASS_CACHE_BYTES", 0)  # no room for one block: nothing cached
    comp.release(a)
    comp.prepare(a)
    assert not comp._cache


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_ties_peak_memory_does_not_grow_with_the_largest_tensor(tmp_path, monkeypatch):
    n = 30 << 20  # one 31.5M-element tensor: 126 MB per float32 copy
    big = _ties_checkpoints(tmp_path / "big", n)
    tiny = _ties_checkpoints(tmp_path / "tiny", 5 << 10)
    # One compute thread: the block pool's in-flight blocks (and glibc's per-thread arenas) scale
    # with the thread count, not with the tensor.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WEIGHTX_CACHE": str(tmp_path / "cache")}
    # Input hashes cached first: this measures the TIES stream, not a hashing thread's arena.
    from weightx.io import provenance

    monkeypatch.setenv("WEIGHTX_CACHE", env["WEIGHTX_CACHE"])
    provenance.Hasher(sorted(tmp_path.glob("*/*/*.safetensors"))).result()
    cmd = [sys.executable, "-c", "from weightx.cli import main; main()", "apply"]
    baseline = _peak_rss_anon(cmd + [str(tiny)], env)  # the interpreter, torch and weightx
    extra = _peak_rss_anon(cmd + [str(big)], env) - baseline
    # The whole-tensor path holds base + 2 deltas in float32 plus its workspaces (~5 copies, about
    # 630 MiB here); streamed, a few 1M-element blocks and the writer's queues. glibc's per-thread
    # arenas keep freed blocks, so the measured extra spread over 48-195 MiB in 12 runs of the same
    # build: the bound is two float32 copies, still a tenth of what the whole tensor costs.
    assert extra < 8 * n, f"peak RssAnon {extra / 2**20:.0f} MiB above a tiny run's"
    import safetensors.torch as st

    out = st.load_file(str(tmp_path / "big" / "out" / "model.safetensors"))
    assert out["model.embed_tokens.weight"].shape == (n // 5, 5)
