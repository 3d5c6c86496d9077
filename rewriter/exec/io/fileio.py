"""Small file helpers of the write paths: clear errors for full or read-only destinations,
positioned writes, hashing an open file, syncing a folder."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Iterator

from core.errors import DestinationFullError, ExecutionError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)
#: Mode of every output file (before the umask): readable by all, like files ``cp`` makes.
OUTPUT_MODE = 0o644


@contextlib.contextmanager
def write_errors_are_clear(where: str) -> Iterator[None]:
    """Turn "no space", "quota", "read-only" and "permission denied" OS errors inside the block
    into an ExecutionError that names ``where`` and says what to do."""
    try:
        yield
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise DestinationFullError(where, e.strerror or "disk full") from None
        if e.errno in _UNWRITABLE:
            raise ExecutionError(
                f"{where}: cannot write to the destination ({e.strerror}); choose a destination "
                f"folder this user can write"
            ) from None
        raise


def pwrite_all(fd: int, data: bytes | memoryview, pos: int, where: str) -> int:
    """Write all of ``data`` at ``pos`` (short writes happen); returns the position after it."""
    view = memoryview(data)
    with write_errors_are_clear(where):
        while view:
            n = os.pwrite(fd, view, pos)
            view = view[n:]
            pos += n
    return pos


def sha256_fd(fd: int, buffer_bytes: int) -> str:
    """sha256 of an open file, read with positioned reads into one bounded buffer."""
    h = hashlib.sha256()
    view = memoryview(bytearray(buffer_bytes))
    pos = 0
    while n := os.preadv(fd, [view], pos):
        h.update(view[:n])
        pos += n
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
