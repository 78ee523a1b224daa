"""The package's import graph: no cycles, no upward imports, a dependency-free base layer.

The graph is read from the source with :mod:`ast`, so it holds every import, also those
inside functions (which run later, but still tie the modules together). A second check
imports the package in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "entropylens"

#: Layers from the bottom up: a module may import its own layer and the ones below.
LAYERS = [
    ("entropylens._version", "entropylens.errors", "entropylens.base", "entropylens._safe_text"),
    # plots draw DataFrames: the analyses declare their figures with them
    ("entropylens.schema", "entropylens.aliases", "entropylens.workers",
     "entropylens.estimators", "entropylens.plots"),
    ("entropylens.store",),
    ("entropylens.engine",),
    ("entropylens.analysis", "entropylens.ingest"),
    ("entropylens.record",),
    ("entropylens.report", "entropylens.live"),
    ("entropylens.api",),
    ("entropylens", "entropylens.cli", "entropylens.integrations"),
]


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("entropylens",) + path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its source)."""
    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    # ``from . import x`` imports the module x when there is one
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _layer(module: str) -> int:
    best, rank = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS"
    return rank


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # collect.py runs the analyses through the registry; the rescorer's sources import the
    # ingest driver inside a function
    assert "entropylens.analysis.registry" in graph["entropylens.report.collect"]
    assert "entropylens.ingest" in graph["entropylens.record.sources"]
    assert "entropylens.store" in graph["entropylens.engine"]


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(f"{source} -> {target}" for source, targets in import_graph().items()
                    for target in targets if _layer(target) > _layer(source))
    assert upward == []


def test_the_base_layer_imports_nothing_else_of_the_package():
    for source, targets in import_graph().items():
        if _layer(source) == 0:
            assert {_layer(t) for t in targets} <= {0}, (source, targets)


def test_importing_the_package_runs_clean_in_a_fresh_interpreter():
    # -W error turns an ImportWarning or a partially-initialised-module warning into a failure
    code = ("import entropylens, entropylens.cli, entropylens.report.build, "
            "entropylens.record, entropylens.plots.entropy; print(entropylens.__version__)")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                          text=True, cwd=PACKAGE.parent, timeout=120)
    assert done.returncode == 0, done.stderr
    from entropylens._version import __version__
    assert done.stdout.strip() == __version__


@pytest.mark.parametrize("module", ["entropylens.store", "entropylens.report.build"])
def test_the_version_comes_from_the_dependency_free_module(module):
    assert "entropylens._version" in import_graph()[module]
    assert "entropylens" not in import_graph()[module]
