"""What is derived again and again from a checkpoint's names: kept, so that a 1 T checkpoint's
100,000+ tensor names are classified and matched once per command, not once per step."""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable
from functools import lru_cache
from typing import Any, TypeVar

T = TypeVar("T")

#: Per owner (by identity; the owner is held, so its id is not reused): key -> value.
_KEPT: dict[int, tuple[object, dict[Hashable, Any]]] = {}
_MAX_KEPT = 1 << 18


def kept(owner: object, key: Hashable, make: Callable[[], T]) -> T:
    """``make()``, remembered for ``owner`` (a frozen family description) and ``key``; at most
    :data:`_MAX_KEPT` values per owner (all forgotten when full)."""
    entry = _KEPT.get(id(owner))
    if entry is None or entry[0] is not owner:
        entry = _KEPT[id(owner)] = (owner, {})
    values = entry[1]
    if key not in values:
        if len(values) >= _MAX_KEPT:
            values.clear()
        values[key] = make()
    return values[key]


@lru_cache(maxsize=256)
def compiled(pattern: str) -> re.Pattern[str]:
    """``re.compile(pattern)``, kept (re's own cache is smaller and slower to look up)."""
    return re.compile(pattern)
