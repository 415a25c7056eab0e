"""The README's first command: the quickstart recipe on the bundled example."""

from __future__ import annotations

import pytest
import json

from conftest import REPO, run_cli


@pytest.mark.slow
def test_quickstart_runs_offline(tmp_path):
    out = tmp_path / "quick"
    r = run_cli("apply", "recipes/quickstart.yaml", "--output", str(out), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    doc = json.loads((out / "weightx.json").read_text())
    assert doc["recipe"]["deltas"][0]["edits"] == [{"expo": {"alpha": 0.3}}]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)


def test_cli_shim_runs_same_app():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "apply" in r.stdout and "plan" in r.stdout and "inspect" in r.stdout
