"""The engine's layers run one way: no module of symdiff/ imports another in a cycle, and
only the SymPy-side modules import SymPy (what their docstrings promise)."""
from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "symdiff"
SYMPY_SIDE = {"stable", "declare", "forms", "accuracy", "measure", "cprint", "fusion", "ops", "derivative_ops",
              "scalar_ops"}


def _imports(path: pathlib.Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(symdiff modules, top-level packages) that ``path`` imports anywhere, lazily included."""
    own, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                own.add(node.module.split(".")[0])
            elif node.level == 1:
                own |= {a.name for a in node.names}
            elif node.module:
                parts = node.module.split(".")
                if parts[0] == "symdiff":
                    own |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
                external.add(parts[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "symdiff" and len(parts) > 1:
                    own.add(parts[1])
                external.add(parts[0])
    return own & modules, external


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    return {m: _imports(PKG / f"{m}.py", modules)[0] - {m} for m in modules}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_between_engine_modules() -> None:
    graph = _graph()
    assert graph["errors"] == set(), "errors.py is the very bottom: every module may raise its errors"
    assert graph["registry"] <= {"errors"}, "the registry is the bottom layer above errors.py"
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = _graph()
    graph["registry"] = graph["registry"] | {"graph"}  # the circle this layout removed
    cycle = _cycle(graph)  # found from whichever of the two the search reaches first
    assert cycle in (["graph", "registry", "graph"], ["registry", "graph", "registry"])


def test_only_the_sympy_side_imports_sympy() -> None:
    modules = {p.stem for p in PKG.glob("*.py")}
    importers = {m for m in modules if "sympy" in _imports(PKG / f"{m}.py", modules)[1]}
    assert importers == SYMPY_SIDE
