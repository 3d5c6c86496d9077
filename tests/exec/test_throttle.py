"""The one progress-rate rule shared by progress bars, log lines and Ray's progress board."""

from __future__ import annotations

from rewriter.exec.io.throttle import Throttle


def test_first_call_is_due_then_at_most_once_per_interval():
    t = Throttle(0.5)
    assert [t.due(now) for now in (100.0, 100.2, 100.49, 100.5, 100.9, 101.1)] == [
        True, False, False, True, False, True]


def test_since_delays_the_first():
    t = Throttle(5.0, since=10.0)
    assert not t.due(14.9) and t.due(15.0) and not t.due(19.0)
