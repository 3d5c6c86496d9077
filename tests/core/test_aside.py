"""Work done in a forked child (core.aside): the same result or error as in the parent, and no
child left behind. The cases that need a child run in a fresh interpreter: the test process may
have threads of its own (servers of other tests), with which no child is forked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from core.aside import Aside

#: Appended to a case that leaves the child's pid in ``pid``: the child is gone and reaped.
REAPED = """
try:
    os.waitpid(pid, os.WNOHANG)
except ChildProcessError:
    pass
else:
    raise AssertionError("the child was left")
"""


def _fresh(code: str, then: str = "") -> None:
    """Run ``code`` (then ``then``) in a new interpreter (one thread, as ``rewriter plan`` runs);
    it asserts."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code) + then], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr


def test_the_result_comes_from_a_child():
    _fresh("""
        import os
        from core.aside import Aside
        with Aside(lambda: (os.getpid(), b"x" * (3 << 20))) as pending:  # larger than a pipe holds
            assert pending.pid
            pid, blob = pending.result()
        assert pid != os.getpid() and blob == b"x" * (3 << 20)
    """)


def test_a_failing_child_fails_again_in_the_parent():
    _fresh("""
        import os
        from core.aside import Aside
        calls = []
        def fn():
            calls.append(os.getpid())
            raise ValueError("bad plan")
        with Aside(fn) as pending:
            assert pending.pid
            try:
                pending.result()
            except ValueError as e:
                assert str(e) == "bad plan"
            else:
                raise AssertionError("no error")
        assert calls == [os.getpid()]  # the child's own call was in its copy of the list
    """)


def test_an_unwanted_child_is_stopped_and_reaped():
    _fresh("""
        import os, time
        from core.aside import Aside
        try:
            with Aside(lambda: time.sleep(60)) as pending:
                pid = pending.pid
                assert pid
                raise RuntimeError("the parent failed first")
        except RuntimeError:
            pass
    """, REAPED)


def test_an_interrupted_wait_stops_the_child_and_keeps_the_interruption():
    _fresh("""
        import os, signal, time
        from core.aside import Aside
        def stop(*_):
            raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, stop)
        try:
            with Aside(lambda: time.sleep(60)) as pending:
                pid = pending.pid
                signal.alarm(1)
                pending.result()  # interrupted while it waits for the child
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("not interrupted")
    """, REAPED)


@pytest.mark.parametrize("why", ["no fork", "threads running"])
def test_without_a_child_it_is_computed_here(monkeypatch, why):
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    if why == "no fork":
        monkeypatch.delattr(os, "fork")
    else:
        t.start()
    try:
        with Aside(os.getpid) as pending:
            assert pending.pid == 0
            assert pending.result() == os.getpid()
    finally:
        stop.set()
        if t.is_alive():
            t.join()
