"""Pure work done in a forked child while the parent goes on: ``plan`` costs a 1 T plan (a fifth
of a second) while it writes the plan file.

The child shares the parent's memory as it was at the fork (copy-on-write), computes, sends back
the pickled result through a pipe and ends with ``os._exit``: no cleanup, no buffered output
written twice. Only what touches nothing outside the process belongs here. Where no child can be
forked (no ``os.fork``, or threads running, which a fork would leave half-copied) or the child
fails, the work is done in the parent when its result is asked for: the same result, or the same
exception, either way.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class Aside(Generic[T]):
    """``fn()`` computed in a forked child; :meth:`result` gives it. Use as a context manager so
    that a child whose result is never asked for (the parent failed first) is stopped."""

    def __init__(self, fn: Callable[[], T]):
        self.fn = fn
        self.pid = 0
        self.fd = -1
        if hasattr(os, "fork") and threading.active_count() == 1:
            self._fork()

    def _fork(self) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: compute, send, leave without cleanup
            status = 1
            try:
                os.close(r)
                data = pickle.dumps(self.fn(), protocol=pickle.HIGHEST_PROTOCOL)
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view):]
                status = 0
            finally:
                os._exit(status)
        os.close(w)
        self.pid, self.fd = pid, r

    def result(self) -> T:
        """The child's result; computed here when there was no child or it failed."""
        if self.pid:
            chunks = []
            fd, self.fd = self.fd, -1  # the file object closes it, also when the read is interrupted
            with os.fdopen(fd, "rb") as f:
                while chunk := f.read(1 << 20):
                    chunks.append(chunk)
            _, status = os.waitpid(self.pid, 0)
            self.pid = 0
            if status == 0:
                try:
                    return pickle.loads(b"".join(chunks))  # type: ignore[no-any-return]
                except Exception:  # a truncated result: compute it here instead
                    pass
        return self.fn()

    def cancel(self) -> None:
        """Stop a child whose result is no longer wanted."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = 0
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Aside[T]:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.cancel()
