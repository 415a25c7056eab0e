"""Shared fixtures: tiny related checkpoints built once per session, and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """bf16 base / sft (= base + noise) / dpo (= sft + noise), sharded into several files."""
    from weightx.testing import make_related_pair

    return make_related_pair(tmp_path_factory.mktemp("family"), with_base=True, max_shard_size="100KB")


@pytest.fixture(scope="session")
def merge_family(tmp_path_factory) -> dict[str, Path]:
    """base plus two independent fine-tunes (math, code) for merge tests."""
    from weightx.testing import make_related_pair

    return make_related_pair(tmp_path_factory.mktemp("merge"), extra=("math", "code"), max_shard_size="150KB")


def write_recipe(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def expo_recipe(sft: Path, dpo: Path, out: Path, alpha: float = 0.3, **output) -> dict:
    return {
        "models": {"sft": str(sft), "dpo": str(dpo)},
        "base": "sft",
        "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": alpha}}]}],
        "output": {"path": str(out), **output},
    }


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `weightx` entry point in a subprocess (exit codes, stderr, no tracebacks)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "weightx", *args], capture_output=True, text=True, env=full_env,
        cwd=cwd or REPO, timeout=timeout,
    )
