"""Where a streamed run's time goes: wall time per named section, each counted exclusively.

Off unless a :class:`Sections` is active (the benchmark's breakdown stage turns it on); then
every section boundary synchronizes the device, so the kernels a section launched are charged to
it rather than to whatever waits for them next. That synchronization itself costs a little and
stops the device from overlapping sections, so a breakdown run is slower than a plain one: its
shares, not its total, are the result.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Sections:
    """Exclusive seconds per section: time inside a nested section is not its parent's."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._last = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def enter(self, name: str) -> None:
        now = self._now()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._last
        self._stack.append(name)
        self.calls[name] += 1
        self._last = now

    def exit(self) -> None:
        now = self._now()
        self.seconds[self._stack.pop()] += now - self._last
        self._last = now


_active: Sections | None = None


def activate(sections: Sections | None) -> None:
    """Record sections into ``sections`` from now on (None: stop)."""
    global _active
    _active = sections


@contextmanager
def section(name: str) -> Iterator[None]:
    """Charge the time inside to ``name`` when a :class:`Sections` is active; else nothing."""
    s = _active
    if s is None:
        yield
        return
    s.enter(name)
    try:
        yield
    finally:
        s.exit()


def time_module(module: torch.nn.Module, name: str) -> None:
    """Charge ``module``'s forward to ``name`` (hooks that do nothing while no sections are active)."""
    def pre(*_: object) -> None:
        if _active is not None:
            _active.enter(name)

    def post(*_: object) -> None:
        if _active is not None:
            _active.exit()

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)
