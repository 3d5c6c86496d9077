"""The import graph: no cycle between files or packages, and every package imports only lower layers.

Imports are read with ``ast`` from the source, so imports inside functions and under
``TYPE_CHECKING`` count as much as module-level ones.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("core", "rewriter", "planners", "ray_jobs", "bench_io", "profiling", "quality")

# Bottom to top; a package may import its own layer or any lower one, never a higher one. Every
# sub-package is a package of its own here: rewriter.exec.dest may import rewriter.exec.io, never
# the reverse.
LAYERS = {
    "core": 0,  # errors, format, storage, layouts, checkpoint model, options declared once
    "planners": 1,  # saliency, policies, plan, cost, serving, the planning API
    "rewriter.exec": 2,  # the options of a run (light: the CLI reads them when it starts)
    "profiling": 2,  # saliency measured with transformers
    "rewriter.exec.io": 3,  # byte movement: copying ranges, output files, parts, throttle
    "rewriter.exec.dest": 4,  # destinations, lock, journal, status document, cleanup
    "rewriter.exec.publish": 5,  # verify, pruning.json, the model card
    "rewriter.exec.run": 6,  # the local run, the dry run
    "rewriter.exec.distributed": 7,  # the run and verify on Ray
    "quality": 7,  # eval and the reference-MoE benchmark
    "rewriter.tools": 8,  # what only commands use: synth, inspect, progress bars, the Ray Jobs client
    "rewriter.cli": 9,  # the commands: parse, call the library, print
    "rewriter": 10,  # the console script (entry.py) and ``python -m rewriter``
    "bench_io": 11,  # benchmarks: use the product, never used by it
    "ray_jobs": 11,  # the Ray job entry point: the CLI's run command on a cluster
}


def module_files() -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> file."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def imported_modules(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file."""
    known = set(known)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def package_of(module: str, files: Mapping[str, Path]) -> str:
    """The package a module's file sits in (a package's ``__init__`` belongs to the package)."""
    if files[module].name == "__init__.py":
        return module
    return module.rpartition(".")[0] or module


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = module_files()
    by_file = {m: imported_modules(m, f, files) for m, f in files.items()}
    by_package: dict[str, set[str]] = {}
    for m, deps in by_file.items():
        pkg = package_of(m, files)
        by_package.setdefault(pkg, set()).update(
            p for p in (package_of(d, files) for d in deps) if p != pkg
        )
    return by_file, by_package


def test_no_cycle_between_files():
    by_file, _ = graphs()
    assert len(by_file) > 40
    assert find_cycle(by_file) is None, " -> ".join(find_cycle(by_file) or [])


def test_no_cycle_between_packages():
    _, by_package = graphs()
    assert find_cycle(by_package) is None, " -> ".join(find_cycle(by_package) or [])


def test_every_package_imports_only_lower_layers():
    _, by_package = graphs()
    assert set(by_package) == set(LAYERS), "a new package needs its place in LAYERS"
    upward = [f"{pkg} -> {dep}" for pkg, deps in by_package.items() for dep in deps
              if LAYERS[dep] > LAYERS[pkg] or (LAYERS[dep] == LAYERS[pkg] and dep != pkg)]
    assert upward == [], "imports against the layering: " + ", ".join(sorted(upward))


def test_planners_import_only_the_lowest_layer():
    _, by_package = graphs()
    assert by_package["planners"] == {"core"}


def test_the_exec_folder_itself_imports_only_the_ground_floor():
    # Its face names the floors and its options module is what the CLI reads when it starts:
    # reaching them must not load the floors (the copier, destinations, planners).
    _, by_package = graphs()
    assert by_package["rewriter.exec"] <= {"core"}
    assert {p for p in by_package if p.startswith("rewriter.exec.")} == {
        "rewriter.exec.io", "rewriter.exec.dest", "rewriter.exec.publish", "rewriter.exec.run",
        "rewriter.exec.distributed"}


def test_the_product_never_imports_the_benchmarks():
    _, by_package = graphs()
    assert [p for p, deps in by_package.items() if "bench_io" in deps] == []


def test_imports_inside_functions_and_type_checking_blocks_count(tmp_path: Path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from planners.plan import Plan\n"
        "def f():\n    import core.storage\n    from rewriter.exec.io import copy\n"
    )
    known = {"planners.plan", "core.storage", "rewriter.exec", "rewriter.exec.io", "rewriter.exec.io.copy",
             "rewriter"}
    assert imported_modules("x", src, known) == {"planners.plan", "core.storage", "rewriter.exec.io.copy"}


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
