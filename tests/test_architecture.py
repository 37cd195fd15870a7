"""The package's import graph has no cycles, counting every import statement (function-local ones
too, where a cycle hides until the function runs): ARCHITECTURE.md's rule, held by a test."""
from __future__ import annotations

import ast
import graphlib
import os

import pytest

import distffn

PACKAGE = os.path.dirname(distffn.__file__)


def modules(root: str = PACKAGE) -> dict[str, str]:
    """{dotted module name: file} of every module in the package at ``root``."""
    found = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(root))[:-3]
                found[rel.replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(folder, f)
    return found


def imported(mod: str, path: str, known: dict) -> set[str]:
    """The package's modules that ``mod`` imports anywhere in its file."""
    here = mod.split(".") if path.endswith("__init__.py") else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = here[:len(here) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:            # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name and name != mod:
                out.add(name)
    return out


def test_the_package_imports_without_cycles():
    known = modules()
    graph = {m: imported(m, p, known) for m, p in known.items()}
    assert len(graph) > 50 and graph["distffn.cli"], "the walk found the package's modules and imports"
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None


def test_a_cycle_behind_a_local_import_would_be_found(tmp_path):
    pkg = tmp_path / "distffn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    known = modules(str(pkg))
    graph = {m: imported(m, p, known) for m, p in known.items()}
    assert graph["distffn.a"] == {"distffn.b"} and graph["distffn.b"] == {"distffn.a"}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())
