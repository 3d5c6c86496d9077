"""What is derived again and again from a checkpoint's names: kept, so that a 1 T checkpoint's
100,000+ tensor names are classified and matched once per command, not once per step; and the
cycle collector paused while such a checkpoint's millions of objects are made."""

from __future__ import annotations

import gc
import re
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

#: Per layout (by identity; the layout is held, so its id is not reused): name -> classification.
_KEPT: dict[int, tuple[object, dict[Hashable, Any]]] = {}
#: Per layout, the same way: what follows ``layers.N.`` in a name -> role and expert id.
_TAILS: dict[int, tuple[object, dict[Hashable, Any]]] = {}
MAX_KEPT = 1 << 18


def _table(store: dict[int, tuple[object, dict[Hashable, Any]]], layout: Any) -> dict[Hashable, Any]:
    """``layout``'s table in ``store``, made empty when it has none."""
    entry = store.get(id(layout))
    if entry is None or entry[0] is not layout:
        entry = store[id(layout)] = (layout, {})
    return entry[1]


def _kept(store: dict[int, tuple[object, dict[Hashable, Any]]], layout: Any, key: str, make: Any) -> Any:
    """``make(key)``, kept in ``layout``'s table: at most :data:`MAX_KEPT` keys, all forgotten
    when full."""
    table = _table(store, layout)
    t = table.get(key, table)  # the table itself: not made yet
    if t is table:
        if len(table) >= MAX_KEPT:
            table.clear()
        t = table[key] = make(key)
    return t


def classified(layout: Any, name: str) -> Any:
    """``layout._classify(name)``, kept per layout (a frozen family description)."""
    return _kept(_KEPT, layout, name, layout._classify)


def remember(layout: Any, names: dict[str, Any]) -> None:
    """Keep the classifications of many names at once (one pass over a checkpoint's names)."""
    table = _table(_KEPT, layout)
    if len(table) + len(names) > MAX_KEPT:
        table.clear()
    if len(names) <= MAX_KEPT:
        table.update(names)


def tails_of(layout: Any) -> dict[Hashable, Any]:
    """``layout``'s table of :func:`tail_classified`: a pass over 140,000 names looks each tail
    up there, and asks :func:`tail_classified` only for the few it lacks."""
    return _table(_TAILS, layout)


def tail_classified(layout: Any, tail: str) -> Any:
    """``layout._classify_tail(tail)``, kept per layout as :func:`classified` keeps names: a 1 T
    checkpoint's 140,000 names end in a few thousand tails (each layer repeats them)."""
    return _kept(_TAILS, layout, tail, layout._classify_tail)


@lru_cache(maxsize=256)
def compiled(pattern: str) -> re.Pattern[str]:
    """``re.compile(pattern)``, kept (re's own cache is smaller and slower to look up)."""
    return re.compile(pattern)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector paused for the block (and left as it was after it).

    Opening, planning, saving and loading a 1 T checkpoint's plan make millions of small objects
    without cycles; each full collection walks every one of them again, a third of the CPU time of
    ``plan`` of Kimi-K2. Nothing is lost: cycles made meanwhile are collected afterwards.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
