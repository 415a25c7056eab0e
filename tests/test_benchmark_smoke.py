"""Smoke test of the benchmark harness (benchmarks/run.py) on the tiny preset.

Runs the real `weightx apply` CLI on synthetic checkpoints made by shared/bench/gen_checkpoints.py
(or, in a clone without ../shared, by weightx.testing) and checks the JSON report. mergekit is left out here (it has its own venv and takes ~6 s just to
import); benchmarks/README.md shows how to run the full comparison.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "run.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_expo_benchmark_reports_weightx(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(RUN),
        "--preset", "tiny", "--repeats", "1", "--only", "expo",
        "--tools", "weightx,floor",
        "--data", str(tmp_path / "data"),
        "--workdir", str(tmp_path),
        "--json", str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"run.py failed:\n{proc.stdout}\n{proc.stderr}"
    assert "| expo | weightx |" in proc.stdout, proc.stdout

    doc = json.loads(out.read_text())
    assert doc["env"]["preset"] == "tiny"
    assert not [n for n in doc["notes"] if n.startswith("weightx skipped")], doc["notes"]

    rows = {(r["case"], r["tool"]): r for r in doc["summary"]}
    wx = rows[("expo", "weightx")]
    assert wx["ok_runs"] == 1
    assert wx["wall_median_s"] > 0
    assert wx["peak_private_mb"] > 0
    assert wx["maxrss_mb"] > 0
    assert wx["output_mb"] > 0  # it wrote a checkpoint (deleted afterwards)

    floor = rows[("expo", "floor")]
    assert floor["wall_median_s"] > 0
    assert wx["wall_vs_floor"] == pytest.approx(wx["wall_median_s"] / floor["wall_median_s"])

    run = next(r for r in doc["runs"] if r["tool"] == "weightx")
    assert run["samples"] >= 1 and run["returncode"] == 0
    assert "apply" in run["cmd"]
    # Outputs are dropped between runs; only the data cache remains.
    assert not list(tmp_path.glob("weightx-bench-*"))
