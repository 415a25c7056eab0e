"""Scale-out: torchrun over gloo on this CPU gives byte-identical output; a failing rank fails the run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from weightx.pipeline.distributed import assign
from conftest import REPO, run_cli, write_recipe

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model*.safetensors"))}


RECIPES = {
    "expo": ({"sft": "sft", "dpo": "dpo"}, "sft", [{"model": "dpo", "edits": [{"expo": {"alpha": 0.3}}]}], "sum"),
    "dare": ({"sft": "sft", "dpo": "dpo"}, "sft", [{"model": "dpo", "edits": [{"dare": {"drop": 0.5, "seed": 3}}]}], "sum"),
    "ties": ({"base": "base", "math": "math", "code": "code"}, "base",
             [{"model": "math"}, {"model": "code"}], {"ties": {"density": 0.5}}),
}


RECIPES["distill"] = ({"sft": "sft", "dpo": "dpo"}, "sft", [{"model": "dpo", "edits": [{"bitdelta": {
    "distill": {"data": str(REPO / "examples" / "corpus.txt"), "steps": 4, "batch_size": 2, "max_length": 32}}}]}], "sum")


def recipe_for(kind: str, fams: dict, out: Path) -> dict:
    models, base, deltas, combine = RECIPES[kind]
    fam = fams["merge"] if kind == "ties" else fams["pair"]
    return {"models": {k: str(fam[v]) for k, v in models.items()}, "base": base, "deltas": deltas,
            "combine": combine, "output": {"path": str(out), "shard_size": "60KB"}}


@pytest.fixture(scope="module")
def fams(family, merge_family):
    return {"pair": family, "merge": merge_family}


def test_assign_is_balanced_and_deterministic():
    sizes = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    parts = assign(sizes, 3)
    assert sorted(i for p in parts for i in p) == list(range(10))
    loads = [sum(sizes[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes)
    assert assign(sizes, 3) == parts
    assert assign([5], 2) == [[0], []]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["expo", "dare", "ties", "distill"])
def test_two_gloo_processes_match_one(fams, tmp_path, kind):
    one = write_recipe(tmp_path / "one.yaml", recipe_for(kind, fams, tmp_path / "one"))
    two = write_recipe(tmp_path / "two.yaml", recipe_for(kind, fams, tmp_path / "two"))
    r = run_cli("apply", str(one))
    assert r.returncode == 0, r.stderr
    p = torchrun("--standalone", "--nproc_per_node", "2", "-m", "weightx", "apply", str(two))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    a, b = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "two")
    assert len(a) >= 2 and a == b
    assert (tmp_path / "two" / "model.safetensors.index.json").read_bytes() == (tmp_path / "one" / "model.safetensors.index.json").read_bytes()
    import json

    doc = json.loads((tmp_path / "two" / "weightx.json").read_text())
    assert doc["device"] == "cpu ×2 ranks"
    assert doc["inputs"] == json.loads((tmp_path / "one" / "weightx.json").read_text())["inputs"]
    assert set(doc["tensors"]) == set(json.loads((tmp_path / "one" / "weightx.json").read_text())["tensors"])


@pytest.mark.slow
def test_two_nodes_on_loopback(fams, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_for("dare", fams, tmp_path / "nodes"))
    ref = write_recipe(tmp_path / "ref.yaml", recipe_for("dare", fams, tmp_path / "ref"))
    assert run_cli("apply", str(ref)).returncode == 0
    port = str(_free_port())
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
    nodes = [torchrun(*common, "--node_rank", str(i), "-m", "weightx", "apply", str(recipe)) for i in (0, 1)]
    for p in nodes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert shard_bytes(tmp_path / "nodes") == shard_bytes(tmp_path / "ref")


@pytest.mark.slow
def test_failing_rank_fails_everything(fams, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_for("expo", fams, tmp_path / "out"))
    p = torchrun("--standalone", "--nproc_per_node", "2", "-m", "weightx", "apply", str(recipe),
                 env={"WEIGHTX_TEST_FAIL_RANK": "1"})
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "injected failure on rank 1" in err
    assert not (tmp_path / "out").exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".out")]
