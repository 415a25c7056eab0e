"""The docs live in the repo and keep up with the code: every recipe key, edit, combine and
parameter is in docs/recipe.md, every layer in docs/architecture.md, and the README links there."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel

from weightx.combine import COMBINES
from weightx.edits import EDITS
from weightx.edits.bitdelta import Distill
from weightx.recipe.model import DeltaSpec, OutputSpec, PushSpec, Recipe, ValidateSpec

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"docs/recipe.md has no section '## {title}'"
    return m.group(1)


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or k for k, f in model.model_fields.items() if k not in ("op", "include", "exclude")]


def test_every_recipe_key_and_parameter_is_documented():
    text = (DOCS / "recipe.md").read_text(encoding="utf-8")
    missing = []
    for title, model in [("Top level", Recipe), ("`deltas[]`", DeltaSpec), ("`output`", OutputSpec),
                         ("`validate`", ValidateSpec), ("`push`", PushSpec), ("Edits", Distill)]:
        part = _section(text, title)
        missing += [f"{title}: {k}" for k in _keys(model) if f"`{k}`" not in part]
    for title, registry in [("Edits", EDITS), ("Combines", COMBINES)]:
        part = _section(text, title)
        for op, cls in registry.items():
            row = next((line for line in part.splitlines() if line.startswith(f"| `{op}` |")), None)
            if row is None:
                missing.append(f"{title}: {op}")
                continue
            missing += [f"{op}.{k}" for k in _keys(cls) if f"`{k}" not in row]
    assert missing == []


def test_architecture_names_every_layer_folder_and_the_readme_links_the_docs():
    arch = (DOCS / "architecture.md").read_text(encoding="utf-8")
    folders = sorted(p.name for p in (ROOT / "weightx").iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert [f for f in folders if f"{f}/" not in arch] == []
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in ("recipe.md", "methods.md", "artifact-format.md", "architecture.md"):
        assert f"docs/{doc}" in readme and (DOCS / doc).is_file()
    assert "DESIGN.md" not in readme and "METHODS.md" not in readme  # not in this repository


def test_the_readme_commands_are_what_ci_runs():
    """Two commands: set-up + quickstart, and the tests; CI runs the same set-up and test command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Set up and run (two commands)", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2 and commands[0].startswith("scripts/setup && .venv/bin/weightx apply recipes/")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci.splitlines() and "bash scripts/setup" in ci
    assert (ROOT / "constraints.txt").read_text().split() == ["torch==2.13.0"]
    assert os.access(ROOT / "scripts" / "setup", os.X_OK)
