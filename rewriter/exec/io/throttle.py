"""How often progress is reported: one rule for progress bars, log lines and Ray's progress board."""

from __future__ import annotations


class Throttle:
    """Says yes at most once every ``every`` seconds.

    Args:
        every: seconds between two yeses.
        since: time of the last yes; by default none yet, so the first call says yes.
    """

    def __init__(self, every: float, since: float | None = None):
        self.every = every
        self.last = float("-inf") if since is None else since

    def due(self, now: float) -> bool:
        """Whether ``every`` seconds have passed since the last yes (and if so, this is one)."""
        if now - self.last < self.every:
            return False
        self.last = now
        return True
