"""mergekit as a second implementation: the same merges on tiny float32 checkpoints.

Needs mergekit 0.1.5 in its own virtualenv (`bash benchmarks/setup_mergekit.sh`, default
benchmarks/.venv-mergekit; or set MERGEKIT_VENV). Skipped, with that reason, when it is absent.
- task arithmetic and ExPO (mergekit `task_arithmetic` / `linear`, normalize false) agree to fp32
  tolerance;
- TIES (mergekit `ties`, sign ties → +1 like weightx's default `zero_sign: positive`) keeps exactly
  the same set of entries, and the values agree to fp32 tolerance.
DARE masks cannot agree (mergekit draws from torch's global generator), so DARE is not compared.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import weightx
from weightx.testing import load_state_dict
from conftest import REPO

VENV = Path(os.environ.get("MERGEKIT_VENV", REPO / "benchmarks" / ".venv-mergekit"))
MERGEKIT_YAML = VENV / "bin" / "mergekit-yaml"

pytestmark = [
    pytest.mark.mergekit,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not MERGEKIT_YAML.exists(),
        reason=f"mergekit not installed at {VENV}: run `bash benchmarks/setup_mergekit.sh` (or set MERGEKIT_VENV)",
    ),
]


@pytest.fixture(scope="module")
def fp32_family(tmp_path_factory) -> dict[str, Path]:
    """float32 base, sft (= base + noise), dpo (= sft + noise), math and code (= base + noise)."""
    from weightx.testing import make_related_pair

    return make_related_pair(tmp_path_factory.mktemp("mk"), dtype=torch.float32, extra=("math", "code"))


def run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump({**config, "dtype": "float32"}, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [str(MERGEKIT_YAML), str(cfg), str(out), "--no-copy-tokenizer", "--lazy-unpickle", "--no-write-model-card"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return load_state_dict(out)


def run_weightx(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    recipe = {**recipe, "output": {"path": str(out), "dtype": "float32"}}
    return load_state_dict(weightx.apply(recipe).path)


def assert_close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_task_arithmetic_agrees(fp32_family, tmp_path):
    f = {k: str(v) for k, v in fp32_family.items()}
    mk = run_mergekit({
        "merge_method": "task_arithmetic", "base_model": f["base"],
        "models": [{"model": f["math"], "parameters": {"weight": 0.7}}, {"model": f["code"], "parameters": {"weight": 1.3}}],
        "parameters": {"normalize": False},
    }, tmp_path / "mk")
    wx = run_weightx({
        "models": {"base": f["base"], "math": f["math"], "code": f["code"]}, "base": "base",
        "deltas": [{"model": "math", "weight": 0.7}, {"model": "code", "weight": 1.3}], "combine": "sum",
    }, tmp_path / "wx")
    assert_close(wx, mk)


def test_expo_agrees_with_linear(fp32_family, tmp_path):
    """ExPO α = 0.3 = mergekit linear with weights dpo 1.3, sft −0.3, normalize false."""
    f = {k: str(v) for k, v in fp32_family.items()}
    mk = run_mergekit({
        "merge_method": "linear",
        "models": [{"model": f["dpo"], "parameters": {"weight": 1.3}}, {"model": f["sft"], "parameters": {"weight": -0.3}}],
        "parameters": {"normalize": False},
    }, tmp_path / "mk")
    wx = run_weightx({
        "models": {"sft": f["sft"], "dpo": f["dpo"]}, "base": "sft",
        "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": 0.3}}]}],
    }, tmp_path / "wx")
    assert_close(wx, mk)


@pytest.mark.parametrize("weights,density", [((1.0, 1.0), 0.5), ((0.75, 1.5), 0.25)])
def test_ties_keeps_the_same_entries(fp32_family, tmp_path, weights, density):
    f = {k: str(v) for k, v in fp32_family.items()}
    w1, w2 = weights
    mk = run_mergekit({
        "merge_method": "ties", "base_model": f["base"],
        "models": [
            {"model": f["math"], "parameters": {"weight": w1, "density": density}},
            {"model": f["code"], "parameters": {"weight": w2, "density": density}},
        ],
    }, tmp_path / "mk")
    wx = run_weightx({
        "models": {"base": f["base"], "math": f["math"], "code": f["code"]}, "base": "base",
        "deltas": [{"model": "math", "weight": w1}, {"model": "code", "weight": w2}],
        "combine": {"ties": {"density": density, "zero_sign": "positive", "normalize": True}},
    }, tmp_path / "wx")
    base = load_state_dict(fp32_family["base"])
    assert set(wx) == set(mk)
    changed = 0
    for name in wx:
        kept_wx = (wx[name] != base[name]).numpy()
        kept_mk = (mk[name] != base[name]).numpy()
        assert np.array_equal(kept_wx, kept_mk), f"{name}: {np.count_nonzero(kept_wx != kept_mk)} entries differ"
        changed += int(kept_wx.sum())
    assert changed > 0
    assert_close(wx, mk)


# --- mergekit configs as input: the same YAML file through mergekit-yaml and `weightx apply` -------


def _mk_file(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump({**config, "dtype": "float32"}, sort_keys=False))
    return path


def _both(config: dict, tmp_path: Path) -> tuple[dict, dict]:
    mk = run_mergekit(config, tmp_path / "mk")
    wx = load_state_dict(weightx.apply(_mk_file(tmp_path, config), output=tmp_path / "wx").path)
    return wx, mk


def _configs(f: dict) -> dict[str, dict]:
    attn, mlp = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": f["math"], "parameters": {"weight": 0.5}}, {"model": f["code"], "parameters": {"weight": 0.3}},
            {"model": f["sft"], "parameters": {"weight": 0.2}}]},
        "linear, base listed": {"merge_method": "linear", "base_model": f["base"], "models": [
            {"model": f["base"], "parameters": {"weight": 0.4}}, {"model": f["math"], "parameters": {"weight": 1.0}},
            {"model": f["code"], "parameters": {"weight": 0.6}}], "parameters": {"normalize": False}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": f["base"], "models": [
            {"model": f["math"], "parameters": {"weight": 0.7}}, {"model": f["code"], "parameters": {"weight": 1.1}}],
            "parameters": {"lambda": 0.8}},
        "ties, per-model density, lambda": {"merge_method": "ties", "base_model": f["base"], "models": [
            {"model": f["math"], "parameters": {"weight": 0.8, "density": 0.5}},
            {"model": f["code"], "parameters": {"weight": 1.2, "density": 0.3}}], "parameters": {"lambda": 1.2}},
        "ties, density gradient": {"merge_method": "ties", "base_model": f["base"], "models": [
            {"model": f["math"], "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
            {"model": f["code"], "parameters": {"weight": 1.0, "density": 0.5}}], "parameters": {"normalize": False}},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": f["base"], "models": [
            {"model": f["math"], "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.05}},
            {"model": f["code"], "parameters": {"weight": 0.5, "density": 0.4, "gamma": 0.02}}]},
        "slerp, canonical filters": {"merge_method": "slerp", "base_model": f["base"], "models": [
            {"model": f["base"]}, {"model": f["math"]}],
            "parameters": {"t": [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": mlp}, {"value": 0.5}]}},
        "model_stock": {"merge_method": "model_stock", "base_model": f["base"], "models": [
            {"model": f["math"]}, {"model": f["code"]}, {"model": f["sft"]}]},
        "model_stock filter_wise": {"merge_method": "model_stock", "base_model": f["base"], "models": [
            {"model": f["math"]}, {"model": f["code"]}], "parameters": {"filter_wise": True}},
        "nuslerp, task vectors": {"merge_method": "nuslerp", "base_model": f["base"], "models": [
            {"model": f["math"], "parameters": {"weight": 1.0}}, {"model": f["code"], "parameters": {"weight": 3.0}}]},
        "nuslerp, row-wise models": {"merge_method": "nuslerp", "models": [
            {"model": f["math"], "parameters": {"weight": 2.0}}, {"model": f["code"], "parameters": {"weight": 1.0}}],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "sce": {"merge_method": "sce", "base_model": f["base"], "models": [
            {"model": f["math"]}, {"model": f["code"]}, {"model": f["sft"]}], "parameters": {"select_topk": 0.5}},
    }


CASES = ["linear", "linear, base listed", "task_arithmetic", "ties, per-model density, lambda", "ties, density gradient",
         "breadcrumbs_ties", "slerp, canonical filters", "model_stock", "model_stock filter_wise", "nuslerp, task vectors",
         "nuslerp, row-wise models", "sce"]


@pytest.mark.parametrize("case", CASES)
def test_mergekit_config_runs_as_is_and_agrees(fp32_family, tmp_path, case):
    """The deterministic methods: every tensor equal to mergekit's up to float32 rounding, except
    where a top-k threshold falls on entries with equal |δ|: weightx keeps the lowest flat index,
    mergekit whatever its sort order gives. Those entries must be ties, and are at most 1e-4 of all."""
    config = _configs({k: str(v) for k, v in fp32_family.items()})[case]
    wx, mk = _both(config, tmp_path)
    assert set(wx) == set(mk)
    sd = {k: load_state_dict(v) for k, v in fp32_family.items()}
    tie_broken = 0
    for name in wx:
        far = ~torch.isclose(wx[name], mk[name], rtol=2e-5, atol=2e-6)
        if far.any():
            # The one documented difference: which of several entries with the same |δ| a top-k
            # keeps at its threshold. Every differing entry must hold such a tie in some delta.
            tied = torch.zeros_like(far)
            for k in ("math", "code", "sft"):
                mags = (sd[k][name] - sd["base"][name]).abs()
                _, inverse, counts = torch.unique(mags, return_inverse=True, return_counts=True)
                tied |= counts[inverse] > 1
            assert bool((far <= tied).all()), f"{case}: {name}: {int((far & ~tied).sum())} entries differ without a tie"
            tie_broken += int(far.sum())
    total = sum(t.numel() for t in wx.values())
    assert tie_broken <= 1e-4 * total, f"{case}: {tie_broken} tie-broken entries of {total}"


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_mergekit_random_configs_agree_in_distribution(fp32_family, tmp_path, method):
    """Random masks cannot agree (mergekit: torch.bernoulli on the global generator; weightx: the
    counter hash). Stated and bounded instead: per tensor the kept fraction is density ± 5σ for both
    (DELLA's per-entry probabilities average to the density), and with rescale (L1) each delta's L1
    norm is restored by both to float32 rounding."""
    f = {k: str(v) for k, v in fp32_family.items()}
    config = {"merge_method": method, "base_model": f["base"], "models": [
        {"model": f["math"], "parameters": {"weight": 1.0, "density": 0.3, **({"epsilon": 0.1} if method == "della_linear" else {})}}]}
    wx, mk = _both(config, tmp_path)
    base, math_ = load_state_dict(fp32_family["base"]), load_state_dict(fp32_family["math"])
    for name in wx:
        delta = (math_[name] - base[name]).double()
        n = delta.numel()
        for out in (wx[name], mk[name]):
            got = (out - base[name]).double()
            kept = float((got != 0).double().mean())
            assert abs(kept - 0.3) <= 5 * (0.3 * 0.7 / n) ** 0.5 + 1 / n, name
            if n >= 100:
                assert float(got.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4), name
