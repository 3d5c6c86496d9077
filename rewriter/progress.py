"""A terminal progress line for byte counts (bytes/s and ETA). Only the CLI uses it."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from planners.cost import human_bytes


class ByteProgress:
    """Callable progress sink: ``progress(n)`` adds ``n`` bytes; redraws at most 5 times a second."""

    def __init__(self, total: int = 0, label: str = "rewrite", stream: TextIO | None = None, enabled: bool = True):
        self.total = total
        self.done = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._t0 = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def start(self, total: int) -> None:
        self.total = total
        self._t0 = time.monotonic()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and now - self._last >= 0.2:
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._t0, 1e-9)
        rate = self.done / elapsed
        frac = self.done / self.total if self.total else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total else 0.0
        width = 30
        bar = "#" * int(frac * width)
        self.stream.write(
            f"\r{self.label} [{bar:<{width}}] {frac:6.1%} {human_bytes(self.done)}/{human_bytes(self.total)} "
            f"{human_bytes(rate)}/s ETA {eta:5.0f}s "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
