"""Size limits that keep the code readable: functions fit on a screen, modules stay small.

Measured with ``ast`` over the product packages (``profiling`` and ``quality``, torch-facing
research code, are not held to them).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 320  # "about 300": one module per concern, none that needs scrolling far
CHECKED = ("core", "rewriter", "planners", "ray_jobs")


def long_functions(root: Path, limit: int) -> list[str]:
    """``file:line name (N lines)`` of every function or method longer than ``limit`` lines,
    counted from its ``def`` (decorators excluded) to its last line."""
    out = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    out.append(f"{f.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_is_longer_than_a_screen():
    too_long = [x for pkg in CHECKED for x in long_functions(REPO / pkg, MAX_FUNCTION_LINES)]
    assert too_long == [], "\n".join(too_long)


def test_no_module_is_longer_than_about_300_lines():
    sizes = {str(f.relative_to(REPO)): len(f.read_text().splitlines())
             for pkg in CHECKED for f in (REPO / pkg).rglob("*.py")}
    assert {"rewriter/exec/run/executor.py", "rewriter/cli/running.py", "planners/plan.py"} <= set(sizes)
    assert {k: v for k, v in sizes.items() if v > MAX_MODULE_LINES} == {}


def test_the_measure_finds_a_long_function(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * 70 + "\ndef g():\n    pass\n")
    found = long_functions(tmp_path, MAX_FUNCTION_LINES)
    assert len(found) == 1 and found[0].endswith("f (71 lines)")
