"""What every benchmark report shares: the ratio table and a headless pyplot (or none)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def ratio_rows(ratios: Mapping[str, float]) -> list[str]:
    """A Markdown table of named ratios."""
    return ["| ratio | value |", "|---|---:|", *(f"| {k} | {v:.3f} |" for k, v in ratios.items())]


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` drawing to files, or None where matplotlib is not installed (charts
    are then left out; tables and JSON are written all the same)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
