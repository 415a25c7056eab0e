"""The fused bf16 path (weightx.kernels.fused) writes exactly the bytes of the general path.

The general path is the reference: torch's float32 operations in the engine's order. The kernel is
compared with it element for element on adversarial values, and whole runs with WEIGHTX_FUSED=0
(general) against the default (fused) on the bf16 test models, byte for byte; the norms the run
records against float64 numpy.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import weightx
from weightx.combine.sum import weighted_sum
from weightx.kernels import fused
from weightx.pipeline.compute import NonFiniteWarning
from weightx.testing import load_state_dict

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    """The test models are below the size from which runs take the fused path by themselves."""
    monkeypatch.setenv("WEIGHTX_FUSED", "1")


def general(base: torch.Tensor, models: list[torch.Tensor], factors: list[list[float]], weights: list[float],
            divisor: float | None) -> torch.Tensor:
    """The engine's general path for this formula: the same torch calls, in its order."""
    b = base.to(torch.float32)
    deltas = []
    for x, fs in zip(models, factors):
        d = x.to(torch.float32).sub_(b)
        for f in fs:
            d = d.mul_(f)
        deltas.append(d)
    c = weighted_sum(deltas, weights)
    if divisor is not None:
        c = c.div_(divisor)
    return b.add_(c).to(torch.bfloat16)


def bits(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy().view(np.uint16)


def adversarial(n: int, seed: int) -> torch.Tensor:
    """bf16 values of every kind but NaN/Inf: normal, tiny, subnormal, ±0, large (to 1e17: the kernel
    leaves blocks with |x| past ~1e18 to the general path, as it does NaN/Inf)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    x = x.to(torch.bfloat16)
    raw = bits(x).copy()
    k = n // 8
    idx = torch.randperm(n, generator=g)[:4 * k].numpy()
    raw[idx[:k]] = torch.randint(0, 0x80, (k,), generator=g).numpy().astype(np.uint16)  # subnormals
    raw[idx[k:2 * k]] = np.uint16(0x8000)  # −0
    raw[idx[2 * k:3 * k]] = np.uint16(0)  # +0
    raw[idx[3 * k:]] = (torch.randint(0x5800, 0x5A00, (k,), generator=g).numpy()).astype(np.uint16)  # ~1e15..1e17
    return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)


CASES = [
    ([[1.3]], [1.0], None),  # ExPO
    ([[0.7, 1.1]], [0.6], None),  # ExPO then scale, weighted
    ([[1.3], [0.5]], [1.0, 1.0], None),  # task arithmetic
    ([[], [2.0], [1.0 / 3.0]], [0.2, 0.3, 0.5], 3.0),  # mean
    ([[-0.4], []], [1.7, -0.3], 1.4),  # normalised linear
]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 4095, 4096, 4097, 1 << 20])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_equals_general_path_bit_for_bit(n, case):
    factors, weights, divisor = CASES[case]
    base = adversarial(n, 1)
    models = []
    for i in range(len(factors)):
        near = (base.float() + adversarial(n, 10 + i).float() * 1e-3).to(torch.bfloat16)
        far = adversarial(n, 20 + i)
        models.append(torch.where(torch.arange(n) % 3 == 0, far, near))
    want = general(base, models, factors, weights, divisor)
    got = fused.linear_bf16(base, models, factors, weights, divisor)
    assert torch.isfinite(want.float()).all()
    assert got is not None
    out, before, after, combined = got
    assert np.array_equal(bits(out), bits(want))
    # Norms against float64 of the same float32 intermediates (computed here with torch, no kernel).
    b = base.to(torch.float64)
    ds, es = [], []
    for x, fs in zip(models, factors):
        d = x.to(torch.float32) - base.to(torch.float32)
        ds.append(d.double())
        for f in fs:
            d = d * f
        es.append(d)
    for i in range(len(models)):
        assert before[i] == pytest.approx(float((ds[i] ** 2).sum()), rel=1e-6)
        assert after[i] == pytest.approx(float((es[i].double() ** 2).sum()), rel=1e-6)
    comb = weighted_sum([e.clone() for e in es], weights)
    if divisor is not None:
        comb = comb / divisor
    assert combined == pytest.approx(float((comb.double() ** 2).sum()), rel=1e-6)
    assert b.numel() == n


# ---- DARE's drop mask (k = 0, elementwise rescale) as a step of the fused pass --------------------

# Per delta its steps in order: ("f", c) multiplies, ("dare", drop, rescale, seed) is the edit itself.
MASKED = [
    ([[("dare", 0.9, "inverse_keep", 0)]], [1.0], None),  # DARE alone (the benchmark's recipe)
    ([[("dare", 0.5, "none", None), ("f", 1.3)]], [1.0], None),  # drop, then ExPO
    ([[("f", -0.5), ("dare", 0.3, "none", 7)]], [0.8], None),  # a negative factor before the mask: +0.0
    ([[("dare", 0.3, "none", 7), ("f", -0.5)]], [0.8], None),  # and after it: −0.0
    ([[("f", 1.3), ("f", -2.0), ("dare", 0.6, "none", 2)]], [1.0], None),  # mask after both factors
    ([[("f", 1.3), ("dare", 0.25, "inverse_keep", None)]], [1.0], None),  # ExPO, then DARE with its rescale
    # dare_linear over two deltas with their own masks, and a delta without one
    ([[("dare", 0.9, "inverse_keep", None)], [("dare", 0.5, "inverse_keep", None)], [("f", 0.5)]],
     [0.2, 0.3, 0.5], 3.0),
]


def general_steps(base, models, steps, weights, divisor, offset):
    """The engine's general path with the real DARE edit (`Dare.apply` on a block at `offset`)."""
    from weightx.edits.base import TensorContext
    from weightx.edits.dare import Dare

    b = base.to(torch.float32)
    deltas = []
    for i, (x, st) in enumerate(zip(models, steps)):
        d = x.to(torch.float32).sub_(b)
        ctx = TensorContext("w", (offset + d.numel(),), offset, delta=f"m{i}")
        for step in st:
            d = d.mul_(step[1]) if step[0] == "f" else Dare(drop=step[1], rescale=step[2], seed=step[3]).apply(d, ctx)
        deltas.append(d)
    edited = [d.clone() for d in deltas]  # weighted_sum works in place
    c = weighted_sum(deltas, weights)
    if divisor is not None:
        c = c.div_(divisor)
    return b.add_(c).to(torch.bfloat16), edited


def kernel_steps(steps):
    """The same steps as the engine hands them to the kernel (`TensorComputer._kernel_steps`)."""
    from weightx.edits.base import TensorContext
    from weightx.edits.dare import Dare

    factors, masks = [], []
    for i, st in enumerate(steps):
        fs, mask = [], None
        for step in st:
            if step[0] == "f":
                fs.append(step[1])
                continue
            drop = Dare(drop=step[1], rescale=step[2], seed=step[3]).random_drop()
            mask = fused.Mask(TensorContext("w", (1,), delta=f"m{i}").seed_key(drop.seed), drop.drop, len(fs))
            if drop.factor != 1.0:
                fs.append(drop.factor)
        factors.append(fs)
        masks.append(mask)
    return factors, masks


@pytest.mark.parametrize("offset", [0, 4093, (1 << 32) - 1000])  # the last crosses 2³²: new round keys
@pytest.mark.parametrize("n", [1, 17, 4097, 1 << 20])
@pytest.mark.parametrize("case", range(len(MASKED)))
def test_masked_kernel_equals_general_dare_bit_for_bit(n, case, offset):
    steps, weights, divisor = MASKED[case]
    base = adversarial(n, 1)
    models = []
    for i in range(len(steps)):
        near = (base.float() + adversarial(n, 10 + i).float() * 1e-3).to(torch.bfloat16)
        models.append(torch.where(torch.arange(n) % 3 == 0, adversarial(n, 20 + i), near))
    want, edited = general_steps(base, models, steps, weights, divisor, offset)
    factors, masks = kernel_steps(steps)
    got = fused.linear_bf16(base, models, factors, weights, divisor, masks, offset)
    assert got is not None
    out, _, after, _ = got
    assert np.array_equal(bits(out), bits(want))
    for i in range(len(models)):
        assert after[i] == pytest.approx(float((edited[i].double() ** 2).sum()), rel=1e-6, abs=1e-30)


def test_masked_kernel_drops_the_papers_share_and_rescales():
    """Independently of the general path: about p of the entries become +0.0 (from any sign), the
    rest are the delta times 1/(1 − p), rounded once."""
    n, p = 1 << 20, 0.9
    base = torch.zeros(n, dtype=torch.bfloat16)
    model = (torch.randn(n, generator=torch.Generator().manual_seed(3)) * 0.01).to(torch.bfloat16)
    (factors,), (mask,) = kernel_steps([[("dare", p, "inverse_keep", 0)]])
    out, before, after, _ = fused.linear_bf16(base, [model], [factors], [1.0], None, [mask], 0)
    x, m = out.double().numpy(), model.double().numpy()
    dropped = bits(out) == 0
    assert abs(dropped.mean() - p) < 5 * (p * (1 - p) / n) ** 0.5
    want = (m[~dropped].astype(np.float32) * np.float32(1 / (1 - p))).astype(np.float64)
    assert np.allclose(x[~dropped], want, rtol=2 ** -8, atol=0)  # one bf16 rounding
    assert before == pytest.approx([float((m ** 2).sum())], rel=1e-6)
    assert after[0] == pytest.approx(float((want ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_masked_kernel_drops_nonfinite_entries_like_dare(value):
    """A NaN/Inf the mask drops becomes +0.0 and the block stays on the fused path; one it keeps
    sends the block to the general path."""
    from weightx.kernels import rng

    n = 5000
    base = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    model = (base.float() + 0.01).to(torch.bfloat16)
    steps = [[("dare", 0.9, "inverse_keep", 4)]]
    factors, masks = kernel_steps(steps)
    kept = np.concatenate([w.numpy().copy() for _, w in rng.keep_words(masks[0].key, 0, n, 0.9, torch.device("cpu"))]) != 0
    model[torch.from_numpy(~kept)] = value
    want, _ = general_steps(base, [model], steps, [1.0], None, 0)
    got = fused.linear_bf16(base, [model], factors, [1.0], None, masks, 0)
    assert got is not None and np.array_equal(bits(got[0]), bits(want))
    model[int(np.flatnonzero(kept)[0])] = value
    assert fused.linear_bf16(base, [model], factors, [1.0], None, masks, 0) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_kernel_leaves_nonfinite_blocks_to_the_general_path(value):
    base = torch.randn(5000).to(torch.bfloat16)
    model = (base.float() + 0.01).to(torch.bfloat16)
    model[4321] = value
    assert fused.linear_bf16(base, [model], [[1.3]], [1.0], None) is None
    big = torch.full((40,), 3.0e38).to(torch.bfloat16)  # finite inputs, the extrapolation overflows
    assert fused.linear_bf16(big * 0.5, [big], [[1.3]], [1.0], None) is None


def test_kernel_reads_mapped_read_only_views(tmp_path):
    """Inputs are views of read-only mappings: the kernel never writes them."""
    from safetensors.torch import save_file
    from weightx.io.safetensors import MappedFile, read_header

    base, model = torch.randn(3000).to(torch.bfloat16), torch.randn(3000).to(torch.bfloat16)
    save_file({"b": base, "m": model}, str(tmp_path / "x.safetensors"))
    header = read_header(tmp_path / "x.safetensors")
    mf = MappedFile(header)
    try:
        views = [mf.view(header.tensors[k], 0, 3000) for k in ("b", "m")]
        out = fused.linear_bf16(views[0], [views[1]], [[1.3]], [1.0], None)[0]
        assert torch.equal(out.view(torch.int16), general(base, [model], [[1.3]], [1.0], None).view(torch.int16))
    finally:
        mf.close()


# ---- whole runs: fused (default) against WEIGHTX_FUSED=0 -----------------------------------------


def recipes(f: dict[str, Path], out: Path) -> dict[str, dict]:
    models = {k: str(v) for k, v in f.items()}
    two = [{"model": "math", "weight": 0.7, "edits": [{"expo": {"alpha": 0.4}}, {"scale": {"factor": 0.9}}]},
           {"model": "code", "weight": 1.2}]
    common = {"models": models, "base": "base", "output": {"path": str(out), "config_from": "math"}}
    return {
        "expo": {**common, "deltas": [{"model": "math", "edits": [{"expo": {"alpha": 0.3}}]}]},
        "sum": {**common, "deltas": two, "combine": "sum"},
        "mean": {**common, "deltas": two, "combine": "mean"},
        "linear": {**common, "deltas": two, "combine": {"linear": {"normalize": True, "base_weight": 0.5}}},
        "task_arithmetic": {**common, "deltas": [{"model": "math", "edits": [{"scale": {"factor": 0.5}}]},
                                                 {"model": "code", "edits": [{"scale": {"factor": 0.5}}]}]},
        "dare": {**common, "deltas": [{"model": "math", "edits": [{"dare": {"drop": 0.9, "seed": 0}}]}]},
        # dare_linear: unseeded, so each delta gets its own mask; one drops without rescaling, then ExPO
        "dare_linear": {**common, "combine": {"linear": {"normalize": True}}, "deltas": [
            {"model": "math", "weight": 0.6, "edits": [{"dare": {"drop": 0.5}}]},
            {"model": "code", "weight": 0.4, "edits": [{"dare": {"drop": 0.7, "rescale": "none"}}, {"expo": {"alpha": 0.2}}]}]},
        # DARE on the MLP weights only, ExPO everywhere: tensors with and without a mask in one run
        "dare_some": {**common, "deltas": [{"model": "math", "edits": [
            {"dare": {"drop": 0.8, "include": ["*mlp*"]}}, {"expo": {"alpha": 0.5}}]}]},
        # a sparse delta artifact of the DARE'd model (`format: delta`, values stored where kept)
        "dare_sparse": {**common, "output": {**common["output"], "format": "delta"},
                        "deltas": [{"model": "math", "edits": [{"dare": {"drop": 0.9, "seed": 3}}]}]},
    }


class Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = fused.linear_bf16

        def spy(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(fused, "linear_bf16", spy)


def run_both(doc: dict, tmp_path: Path, monkeypatch) -> tuple[Path, Path, int]:
    spy = Spy(monkeypatch)
    fast = weightx.apply({**doc, "output": {**doc["output"], "path": str(tmp_path / "fused")}}).path
    calls = spy.calls
    monkeypatch.setenv("WEIGHTX_FUSED", "0")
    plain = weightx.apply({**doc, "output": {**doc["output"], "path": str(tmp_path / "general")}}).path
    monkeypatch.setenv("WEIGHTX_FUSED", "1")
    assert spy.calls == calls  # the switch turns it off
    return Path(fast), Path(plain), calls


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("name", ["expo", "sum", "mean", "linear", "task_arithmetic", "dare", "dare_linear", "dare_some",
                                  "dare_sparse"])
def test_run_bytes_equal_general_path(merge_family, tmp_path, monkeypatch, name):
    doc = recipes(merge_family, tmp_path / "unused")[name]
    fast, plain, calls = run_both(doc, tmp_path, monkeypatch)
    assert calls > 0  # the fused path ran
    same_files(fast, plain)
    a, b = (json.loads((p / "weightx.json").read_text())["tensors"] for p in (fast, plain))
    assert a.keys() == b.keys()
    for t in a:
        for key in ("delta_norm", "edited_norm"):
            for alias, v in a[t][key].items():
                assert v == pytest.approx(b[t][key][alias], rel=1e-5, abs=1e-12), (t, key)
        assert a[t]["combined_norm"] == pytest.approx(b[t]["combined_norm"], rel=1e-5, abs=1e-12), t


def test_recorded_norms_match_float64(merge_family, tmp_path):
    doc = recipes(merge_family, tmp_path / "out")["expo"]
    res = weightx.apply(doc)
    stats = json.loads((Path(res.path) / "weightx.json").read_text())["tensors"]
    base, math = load_state_dict(merge_family["base"]), load_state_dict(merge_family["math"])
    name = "model.layers.0.mlp.up_proj.weight"
    d = math[name].double() - base[name].double()  # bf16 differences are exact in float32 here
    assert stats[name]["delta_norm"]["math"] == pytest.approx(float(d.norm()), rel=1e-6)
    assert stats[name]["edited_norm"]["math"] == pytest.approx(float((d.float() * 1.3).double().norm()), rel=1e-6)


def test_other_dtypes_and_methods_keep_the_general_path(merge_family, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    docs = recipes(merge_family, tmp_path / "x")
    f32 = {**docs["expo"], "output": {**docs["expo"]["output"], "path": str(tmp_path / "f32"), "dtype": "float32"}}
    weightx.apply(f32)
    # DARE that is not a plain mask: the Unified View's k, mergekit's L1 rescale, two DAREs in a row
    for name, edits in {"k": [{"dare": {"drop": 0.5, "k": 0.5, "seed": 1}}],
                        "l1": [{"dare": {"drop": 0.5, "rescale": "l1", "seed": 1}}],
                        "twice": [{"dare": {"drop": 0.5, "seed": 1}}, {"dare": {"drop": 0.2, "seed": 2}}]}.items():
        weightx.apply({**docs["expo"], "output": {**docs["expo"]["output"], "path": str(tmp_path / name)},
                       "deltas": [{"model": "math", "edits": edits}]})
    unnormalised = {**docs["linear"], "output": {**docs["linear"]["output"], "path": str(tmp_path / "lin")},
                    "combine": {"linear": {"normalize": False}}}  # the base joins the sum
    weightx.apply(unnormalised)
    assert spy.calls == 0


def test_dare_blocks_of_any_size_give_the_general_bytes(merge_family, tmp_path, monkeypatch):
    """Each block draws its mask at its own offset in the tensor: the fused run at two block sizes
    writes the general path's files."""
    from weightx.pipeline.engine import write_shards
    from weightx.pipeline.planner import build_plan
    from weightx.recipe.model import load_recipe

    plan = build_plan(load_recipe(recipes(merge_family, tmp_path / "unused")["dare_linear"]))
    assert max(t.numel for t in plan.tensors if t.edit) > 4 * 4096
    spy = Spy(monkeypatch)
    folders = {}
    for switch, block in (("0", 1 << 20), ("1", 4096), ("1", 1000)):
        monkeypatch.setenv("WEIGHTX_FUSED", switch)
        folders[switch, block] = folder = tmp_path / f"{switch}-{block}"
        folder.mkdir()
        write_shards(plan, folder, torch.device("cpu"), block=block)
    assert spy.calls > 0
    for key, folder in folders.items():
        same_files(folder, folders["0", 1 << 20])


def _poisoned_family(f: dict[str, Path], tmp_path: Path, value: float) -> dict[str, Path]:
    import shutil

    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "math"
    shutil.copytree(f["math"], poisoned)
    shard = sorted(poisoned.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 100)
    tensors[name].view(-1)[37] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return {**f, "math": poisoned}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_blocks_same_bytes_and_same_error(merge_family, tmp_path, monkeypatch, value):
    f = _poisoned_family(merge_family, tmp_path, value)
    doc = recipes(f, tmp_path / "unused")["expo"]
    errors = []
    for switch in ("1", "0"):
        monkeypatch.setenv("WEIGHTX_FUSED", switch)
        with pytest.raises(weightx.errors.InputError) as e:
            weightx.apply({**doc, "output": {**doc["output"], "path": str(tmp_path / f"err{switch}")}})
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "index 37" in errors[0]
    monkeypatch.setenv("WEIGHTX_FUSED", "1")
    warn = {**doc, "output": {**doc["output"], "on_nonfinite": "warn"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        fast, plain, calls = run_both(warn, tmp_path, monkeypatch)
    assert calls > 0
    same_files(fast, plain)


def test_small_runs_keep_the_general_path_unless_asked(family, tmp_path, monkeypatch):
    """Loading numba costs more than it saves below AUTO_MIN_ELEMENTS edited elements."""
    spy = Spy(monkeypatch)
    monkeypatch.delenv("WEIGHTX_FUSED")
    doc = {"models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])}, "base": "sft",
           "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": 0.3}}]}]}
    weightx.apply({**doc, "output": {"path": str(tmp_path / "auto")}})
    assert spy.calls == 0
    monkeypatch.setattr(fused, "AUTO_MIN_ELEMENTS", 1)
    weightx.apply({**doc, "output": {"path": str(tmp_path / "big")}})
    assert spy.calls > 0
    same_files(tmp_path / "auto", tmp_path / "big")


_LOADS_NUMBA = """
import json, sys
import weightx
weightx.apply(json.loads(sys.argv[1]))
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"numba", "llvmlite"})))
"""


def test_numba_is_loaded_only_for_a_tensor_the_kernel_runs(merge_family, tmp_path):
    """numba's import costs ~20 MB and ~0.4 s: a TIES run or a DARE with mergekit's L1 rescale (no
    tensor it can fuse) never pays it, however large the run or whatever WEIGHTX_FUSED says."""
    import os
    import subprocess
    import sys

    docs = recipes(merge_family, tmp_path / "x")
    out = lambda name: {**docs["expo"]["output"], "path": str(tmp_path / name)}  # noqa: E731
    cases = {
        "ties": {**docs["sum"], "output": out("ties"), "combine": {"ties": {"density": 0.5}}},
        "dare_l1": {**docs["expo"], "output": out("dare_l1"),
                    "deltas": [{"model": "math", "edits": [{"dare": {"drop": 0.5, "rescale": "l1", "seed": 1}}]}]},
        "expo": {**docs["expo"], "output": out("expo")},  # the controls: they do load numba
        "dare": {**docs["expo"], "output": out("dare"), "deltas": [{"model": "math", "edits": [{"dare": {"drop": 0.5, "seed": 1}}]}]},
    }
    env = {**os.environ, "WEIGHTX_FUSED": "1"}
    loaded = {}
    for name, doc in cases.items():
        got = subprocess.run([sys.executable, "-c", _LOADS_NUMBA, json.dumps(doc)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert got.returncode == 0, got.stderr[-2000:]
        loaded[name] = json.loads(got.stdout.strip().splitlines()[-1])
    assert loaded == {"ties": [], "dare_l1": [], "expo": ["llvmlite", "numba"], "dare": ["llvmlite", "numba"]}
