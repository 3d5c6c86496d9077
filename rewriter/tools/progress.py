"""Progress of byte counts (bytes/s and ETA) on stderr. Only the CLI uses it.

On a terminal the line is redrawn in place (``\\r``) at most five times a second. Anywhere else
(a log file, a pipe, CI) a plain line is written every ``log_every`` seconds instead, so logs do
not fill with carriage returns.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from planners.cost import human_bytes
from rewriter.exec.io.throttle import Throttle


class ByteProgress:
    """Callable progress sink: ``progress(n)`` adds ``n`` bytes.

    Args:
        total: bytes expected (``start`` may set it later); nothing is drawn while it is 0.
        label: first word of each line.
        stream: where to write (stderr by default).
        enabled: False draws nothing (``--quiet``, ``--json``).
        log_every: seconds between lines when ``stream`` is not a terminal.
    """

    def __init__(self, total: int = 0, label: str = "rewrite", stream: TextIO | None = None,
                 enabled: bool = True, log_every: float = 5.0):
        self.total = total
        self.done = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = is_terminal(self.stream)
        self._t0 = time.monotonic()
        self._throttle = Throttle(0.2 if self.tty else log_every, since=self._t0)
        self._drawn = False
        self._lock = threading.Lock()

    def start(self, total: int) -> None:
        self.total = total
        self._t0 = self._throttle.last = time.monotonic()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and self.total and self._throttle.due(now):
                self._draw(now)

    def _line(self, now: float) -> str:
        elapsed = max(now - self._t0, 1e-9)
        done = min(self.done, self.total)
        rate = done / elapsed
        frac = done / self.total
        eta = (self.total - done) / rate if rate > 0 else 0.0
        amounts = f"{frac:6.1%} {human_bytes(done)}/{human_bytes(self.total)} {human_bytes(rate)}/s"
        if not self.tty:
            return f"{self.label}: {amounts.strip()}, ETA {eta:.0f} s"
        width = 30
        bar = "#" * int(frac * width)
        return f"\r{self.label} [{bar:<{width}}] {amounts} ETA {eta:5.0f}s "

    def _draw(self, now: float) -> None:
        self.stream.write(self._line(now) + ("" if self.tty else "\n"))
        self.stream.flush()
        self._drawn = True

    def close(self, completed: bool = True) -> None:
        """Finish the line. ``completed``: the work is whole, so the last line says 100 %.

        Byte callbacks count tensor data only (headers are written apart), so a finished run
        would otherwise stop a little short of its total.
        """
        if not self.enabled or not self.total:
            return
        if completed:
            self.done = self.total
        # Off a terminal a short run that never logged a line stays silent.
        if self.tty or self._drawn:
            self._draw(time.monotonic())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
