"""The package's layers, as a rule the import graph must keep (docs/architecture.md draws them).

Each module imports only from its own layer or the ones below; no module imports another module's
private names; the runtime import graph has no cycle; and the few imports of weightx modules
inside functions are counted and each says why it is there.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "weightx"

# Lowest first. The package root is the public facade (weightx.apply, weightx.Recipe, resolved
# lazily), so it sits on top; the version lives in its own module at the bottom.
LAYERS = [
    ["weightx.errors", "weightx.version"],
    ["weightx.kernels"],
    ["weightx.formats"],
    ["weightx.io"],
    ["weightx.edits"],
    ["weightx.combine"],
    ["weightx.recipe"],
    ["weightx.pipeline"],
    ["weightx.validate"],
    ["weightx.inspect", "weightx.diff", "weightx.direction", "weightx.serving", "weightx.publish", "weightx.smollm", "weightx.testing"],
    ["weightx.api"],
    ["weightx.cli", "weightx.__main__", "weightx"],
]
MAX_LOCAL_IMPORTS = 9


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = ("weightx",) + p.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def layer_of(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or (module.startswith(prefix + ".") and prefix != "weightx")) and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


class _Imports(ast.NodeVisitor):
    """(target module, names, line, inside a function, under TYPE_CHECKING) for each weightx import."""

    def __init__(self, known: set[str]):
        self.known, self.found, self.depth, self.typing = known, [], 0, 0

    def _target(self, module: str, names: list[str]) -> list[tuple[str, str | None]]:
        out = []
        for n in names:  # `from weightx.io import provenance` imports the submodule
            sub = f"{module}.{n}"
            out.append((sub, None) if sub in self.known else (module, n))
        return out

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        checking = isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        self.typing += checking
        for child in node.body:
            self.visit(child)
        self.typing -= checking
        for child in node.orelse:
            self.visit(child)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").split(".")[0] == "weightx":
            for target, name in self._target(node.module, [a.name for a in node.names]):
                self.found.append((target, name, node.lineno, self.depth > 0, self.typing > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] == "weightx":
                self.found.append((a.name, None, node.lineno, self.depth > 0, self.typing > 0))


def imports() -> dict[str, list[tuple[str, str | None, int, bool, bool]]]:
    mods = modules()
    out = {}
    for name, path in mods.items():
        v = _Imports(set(mods))
        v.visit(ast.parse(path.read_text(encoding="utf-8")))
        out[name] = v.found
    return out


def test_every_import_points_to_the_same_layer_or_below():
    wrong = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)}), line {line}"
             for m, found in imports().items() for t, _, line, _, _ in found if layer_of(t) > layer_of(m)]
    assert wrong == []


def test_no_module_imports_another_modules_private_names():
    wrong = [f"{m} line {line}: {t}.{n}" for m, found in imports().items() for t, n, line, _, _ in found
             if n is not None and n.startswith("_") and n != "__version__"]
    assert wrong == []


def test_the_runtime_import_graph_has_no_cycle():
    graph = {m: sorted({t for t, _, _, _, typing in found if not typing and t != m}) for m, found in imports().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t] if t in path else [m, t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_function_local_imports_are_few_and_each_says_why():
    mods = modules()
    local = []
    for m, found in imports().items():
        lines = mods[m].read_text(encoding="utf-8").splitlines()
        for t, _, line, inside, _ in found:
            if inside:
                reason = lines[line - 1].partition("#")[2].strip() or (lines[line - 2].strip().lstrip("#").strip()
                                                                       if lines[line - 2].strip().startswith(("#", '"""')) else "")
                local.append((m, line, t, reason))
    assert len(local) <= MAX_LOCAL_IMPORTS, local
    assert [x for x in local if not x[3]] == []


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    """The walker sees imports inside functions and under TYPE_CHECKING too."""
    v = _Imports({"weightx.api", "weightx.io.sources"})
    v.visit(ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from weightx.api import apply\n"
                      "def f():\n    from weightx.io import sources\n"))
    assert [(t, inside, typing) for t, _, _, inside, typing in v.found] == [("weightx.api", False, True), ("weightx.io.sources", True, False)]
    assert layer_of("weightx.api") > layer_of("weightx.io.sources")


def test_public_names_keep_working():
    import weightx
    import weightx.api
    import weightx.serving

    assert weightx.apply is weightx.api.apply and weightx.plan is weightx.api.plan and weightx.make_plan is weightx.api.plan
    assert weightx.Recipe.__name__ == "Recipe" and weightx.ApplyResult is weightx.api.ApplyResult
    for name in ("load_delta", "apply_delta", "remove_delta"):
        assert getattr(weightx, name) is getattr(weightx.serving, name)
    assert isinstance(weightx.__version__, str)
