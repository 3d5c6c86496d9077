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
MAX_KEPT = 1 << 18


def classified(layout: Any, name: str) -> Any:
    """``layout._classify(name)``, kept per layout (a frozen family description): at most
    :data:`MAX_KEPT` names each, all forgotten when full."""
    entry = _KEPT.get(id(layout))
    if entry is None or entry[0] is not layout:
        entry = _KEPT[id(layout)] = (layout, {})
    names = entry[1]
    t = names.get(name, names)  # the table itself: not classified yet
    if t is names:
        if len(names) >= MAX_KEPT:
            names.clear()
        t = names[name] = layout._classify(name)
    return t


def remember(layout: Any, names: dict[str, Any]) -> None:
    """Keep the classifications of many names at once (one pass over a checkpoint's names)."""
    entry = _KEPT.get(id(layout))
    if entry is None or entry[0] is not layout:
        entry = _KEPT[id(layout)] = (layout, {})
    if len(entry[1]) + len(names) > MAX_KEPT:
        entry[1].clear()
    if len(names) <= MAX_KEPT:
        entry[1].update(names)


#: Per layout, as :data:`_KEPT`: what follows ``layers.N.`` -> role and expert id.
_TAILS: dict[int, tuple[object, dict[str, Any]]] = {}


def tail_classified(layout: Any, tail: str) -> Any:
    """``layout._classify_tail(tail)``, kept per layout as :func:`classified` keeps names: a 1 T
    checkpoint's 140,000 names end in a few thousand tails (each layer repeats them)."""
    entry = _TAILS.get(id(layout))
    if entry is None or entry[0] is not layout:
        entry = _TAILS[id(layout)] = (layout, {})
    tails = entry[1]
    t = tails.get(tail, tails)
    if t is tails:
        if len(tails) >= MAX_KEPT:
            tails.clear()
        t = tails[tail] = layout._classify_tail(tail)
    return t


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
