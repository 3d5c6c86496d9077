"""The README's layer drawing is the tree: it names every package and sub-package, top floor first,
and every module it names exists where it says."""

from __future__ import annotations

import re

from tests.conftest import REPO
from tests.test_layering import LAYERS, PACKAGES


def drawing() -> list[tuple[str, str]]:
    """``(package, its text)`` for each package the drawing names, top to bottom."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("### Layers", 1)[1].split("```", 2)[1]
    rows: list[tuple[str, str]] = []
    for line in block.splitlines():
        m = re.match(r"([a-z_]+(?:/[a-z_]+)*)/\s", line)
        if m:
            rows.append((m.group(1).replace("/", "."), line[m.end():]))
        elif rows:
            rows[-1] = (rows[-1][0], rows[-1][1] + " " + line)
    return rows


def packages() -> set[str]:
    return {".".join(d.relative_to(REPO).parts) for pkg in PACKAGES for d in [REPO / pkg, *(REPO / pkg).rglob("*")]
            if d.is_dir() and (d / "__init__.py").exists()}


def test_the_drawing_names_every_package_once():
    named = [pkg for pkg, _ in drawing()]
    assert sorted(named) == sorted(packages())


def test_the_drawing_goes_from_the_top_floor_down():
    floors = [LAYERS[pkg] for pkg, _ in drawing()]
    assert floors == sorted(floors, reverse=True)


def test_every_module_the_drawing_names_exists_there():
    missing = [f"{pkg}: {name}" for pkg, text in drawing() for name in re.findall(r"\b(\w+)\.py\b", text)
               if not (REPO / pkg.replace(".", "/") / f"{name}.py").exists()]
    assert missing == []
