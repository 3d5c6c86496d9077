"""Files that appear whole or not at all: what a command writes for a user to read back (a plan,
its sidecar) is written under a temporary name, fsynced and renamed over the final name, so a
killed or failed write never leaves a half-written file behind that a later command would read."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO, Any

import fsspec


def write_whole(url: str, write: Callable[[IO[Any]], None], *, binary: bool) -> None:
    """Call ``write(f)`` on a file that becomes ``url`` only once it is complete.

    A local path (or ``file://``) is written as ``<url>.tmp.<pid>``, fsynced, renamed over
    ``url`` and its folder fsynced; the temporary file is removed on any failure. An object store
    (``s3://``, …) publishes an object whole when its upload completes, so it is written directly.
    """
    mode = "wb" if binary else "w"
    if "://" in url and not url.startswith("file://"):
        with fsspec.open(url, mode) as f:
            write(f)
        return
    local = url[len("file://"):] if url.startswith("file://") else url
    tmp = f"{local}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    folder = os.open(os.path.dirname(os.path.abspath(local)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
