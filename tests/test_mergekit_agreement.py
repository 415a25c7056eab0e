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
