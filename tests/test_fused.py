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


@pytest.mark.parametrize("name", ["expo", "sum", "mean", "linear", "task_arithmetic"])
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
    dare = {**docs["expo"], "output": {**docs["expo"]["output"], "path": str(tmp_path / "dare")},
            "deltas": [{"model": "math", "edits": [{"dare": {"drop": 0.5, "seed": 1}}]}]}
    weightx.apply(dare)
    unnormalised = {**docs["linear"], "output": {**docs["linear"]["output"], "path": str(tmp_path / "lin")},
                    "combine": {"linear": {"normalize": False}}}  # the base joins the sum
    weightx.apply(unnormalised)
    assert spy.calls == 0


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
    """numba's import costs ~20 MB and ~0.4 s: a TIES or DARE run (no tensor it can fuse) never pays it,
    however large the run or whatever WEIGHTX_FUSED says."""
    import os
    import subprocess
    import sys

    docs = recipes(merge_family, tmp_path / "x")
    out = lambda name: {**docs["expo"]["output"], "path": str(tmp_path / name)}  # noqa: E731
    cases = {
        "ties": {**docs["sum"], "output": out("ties"), "combine": {"ties": {"density": 0.5}}},
        "dare": {**docs["expo"], "output": out("dare"), "deltas": [{"model": "math", "edits": [{"dare": {"drop": 0.5, "seed": 1}}]}]},
        "expo": {**docs["expo"], "output": out("expo")},  # the control: it does load numba
    }
    env = {**os.environ, "WEIGHTX_FUSED": "1"}
    loaded = {}
    for name, doc in cases.items():
        got = subprocess.run([sys.executable, "-c", _LOADS_NUMBA, json.dumps(doc)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert got.returncode == 0, got.stderr[-2000:]
        loaded[name] = json.loads(got.stdout.strip().splitlines()[-1])
    assert loaded == {"ties": [], "dare": [], "expo": ["llvmlite", "numba"]}
