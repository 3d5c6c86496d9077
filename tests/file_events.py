"""The real CLI, stopped or starved at a chosen file operation instead of at a chosen time.

A kill after "about half the run" lands somewhere else on every machine and every load; a kill
before "the second rename of ``status.json`` after the last journal update" lands in the same
place every time. This module runs ``rewriter.cli`` in the current process with a Python audit
hook that sees each file operation in the destination (an open for writing, a rename, a removal,
and the removals inside ``shutil.rmtree``) and names it ``kind:name``, temporary
names without their pid and random part (``rename:journal.json``, ``open:shard.part``,
``remove:lock``)::

    python -m tests.file_events DST ACTION SPEC -- rewriter arguments...

``ACTION`` is ``trace=FILE`` (append every operation's name to FILE, one a line), ``kill``
(SIGKILL this process just before the operation ``SPEC`` names) or ``fill=PATH`` (just before it,
fill the filesystem holding PATH with a file at PATH until it has no space left, then go on).
``SPEC`` is a chain of ``NAME#N`` stages joined by ``>``: the N-th operation NAME (a glob pattern),
counted after the previous stage was reached (``rename:journal.json#6>rename:status.json#1``,
``rename:journal.json#2>open:*.part#1``); ``-`` for none.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import signal
import sys
import threading
from typing import Any

_TEMPORARY = re.compile(r"\.\d+(\.[0-9a-f]{8})?\.(tmp|part)$")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def op_name(event: str, args: tuple[Any, ...], dst: str) -> str | None:
    """``kind:name`` of a file operation in ``dst`` (None: another event, or outside ``dst``)."""
    if event == "os.rename":
        path, relative = args[1], False
    elif event in ("os.remove", "os.rmdir", "open"):
        path = args[0]
        # shutil.rmtree removes names relative to an open folder (dir_fd): ours are in dst.
        relative = event != "open" and args[-1] is not None
    else:
        return None
    if not isinstance(path, (str, bytes)):
        return None
    path = os.fsdecode(path)
    if not relative and not os.path.abspath(path).startswith(dst + os.sep):
        return None
    if event == "open" and not (isinstance(args[2], int) and args[2] & _WRITE_FLAGS) \
            and not (isinstance(args[1], str) and any(c in args[1] for c in "wax+")):
        return None
    kind = {"os.rename": "rename", "os.remove": "remove", "os.rmdir": "rmdir"}.get(event, "open")
    return f"{kind}:" + _TEMPORARY.sub(r".\2", os.path.basename(path))


def parse_spec(spec: str) -> list[tuple[str, int]]:
    if spec == "-":
        return []
    stages = []
    for stage in spec.split(">"):
        name, _, n = stage.rpartition("#")
        stages.append((name, int(n)))
    return stages


def fill(path: str) -> None:
    """Write zeros to ``path`` until its filesystem is full."""
    block = bytes(1 << 16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    return
                block = bytes(len(block) // 2)  # the last pages, down to the last byte
    finally:
        os.close(fd)


def install(dst: str, action: str, spec: str) -> None:
    stages = parse_spec(spec)
    state = {"stage": 0, "count": 0}
    trace = action[len("trace="):] if action.startswith("trace=") else None
    lock = threading.Lock()  # operations of several threads are counted one at a time
    inside = threading.local()  # the hook's own file operations are not counted

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if getattr(inside, "busy", False):
            return
        name = op_name(event, args, dst)
        if name is None:
            return
        inside.busy = True
        try:
            with lock:
                if trace is not None:
                    with open(trace, "a") as f:
                        f.write(name + "\n")
                if state["stage"] < len(stages) and fnmatch.fnmatchcase(name, stages[state["stage"]][0]):
                    state["count"] += 1
                    if state["count"] == stages[state["stage"]][1]:
                        state["stage"], state["count"] = state["stage"] + 1, 0
                        if state["stage"] == len(stages):
                            act(action)
        finally:
            inside.busy = False

    sys.addaudithook(hook)


def act(action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("fill="):
        fill(action[len("fill="):])


def main() -> None:
    dst, action, spec, sep, *rest = sys.argv[1:]
    assert sep == "--", "usage: python -m tests.file_events DST ACTION SPEC -- rewriter arguments..."
    install(os.path.abspath(dst), action, spec)
    from rewriter.cli import main as cli

    sys.argv = ["rewriter", *rest]
    cli()


if __name__ == "__main__":
    main()
