"""A killed run never leaves anything at output.path; an existing output is kept unless --overwrite."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import weightx
from weightx.errors import UsageError
from weightx.testing import make_related_pair
from conftest import REPO, expo_recipe, write_recipe


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    """~45 MB per checkpoint so a run lasts long enough to be killed mid-write."""
    return make_related_pair(tmp_path_factory.mktemp("big"), hidden=512, intermediate=1536, layers=4, vocab=2048,
                             dtype=__import__("torch").float32, max_shard_size="20MB")


@pytest.mark.slow
def test_sigkill_mid_write_leaves_nothing(bigger, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", expo_recipe(bigger["sft"], bigger["dpo"], tmp_path / "out", 0.3, shard_size="10MB"))
    rng = random.Random(0)
    killed_mid_run = 0
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-m", "weightx", "apply", str(recipe), "--overwrite"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until the temporary folder exists, then kill at a random point of the write
        deadline = time.time() + 60
        while time.time() < deadline and not list(tmp_path.glob(".out.weightx-tmp-*")):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        alive = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_mid_run += alive
        out = tmp_path / "out"
        if out.exists():  # only ever a complete output (a previous attempt may have finished)
            doc = json.loads((out / "weightx.json").read_text())
            assert doc["status"] == "complete"
    assert killed_mid_run >= 3
    # the next run sweeps the dead runs' temporary folders and succeeds
    res = weightx.apply(recipe, overwrite=True)
    assert (res.path / "weightx.json").exists()
    assert not list(tmp_path.glob(".out.weightx-tmp-*"))


def test_existing_output_refused_then_replaced(tmp_path, family):
    doc = expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3)
    weightx.apply(doc)
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        weightx.apply(doc)
    first = json.loads((tmp_path / "out" / "weightx.json").read_text())["recipe"]["deltas"][0]["edits"]
    weightx.apply(doc, overrides=["deltas.0.edits.0.expo.alpha=0.5"], overwrite=True)
    second = json.loads((tmp_path / "out" / "weightx.json").read_text())["recipe"]["deltas"][0]["edits"]
    assert first != second and second == [{"expo": {"alpha": 0.5}}]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_failure_mid_run_cleans_up(tmp_path, family, monkeypatch):
    import weightx.pipeline.engine as engine

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.ShardWriter, "write_raw", boom)
    from weightx.errors import OutputError

    with pytest.raises(OutputError, match="the disk is full; the temporary files were removed"):
        weightx.apply(expo_recipe(family["sft"], family["dpo"], tmp_path / "out", 0.3))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.weightx-tmp-*"))
