"""A quick bandwidth measurement of the disk holding a directory, for cost estimates."""

from __future__ import annotations

import os
import tempfile
import time


def measure_disk(directory: str, nbytes: int = 256 << 20, block: int = 8 << 20) -> tuple[float, float]:
    """Write ``nbytes`` with fsync, drop them from the page cache, read them back.

    Returns:
        (read bytes/s, write bytes/s). The read figure is from the device only where the kernel
        honours ``POSIX_FADV_DONTNEED``; otherwise it is an upper bound.
    """
    buf = os.urandom(block)
    fd, path = tempfile.mkstemp(prefix=".rewriter-probe-", dir=directory)
    try:
        t = time.perf_counter()
        for _ in range(nbytes // block):
            os.write(fd, buf)
        os.fsync(fd)
        write_bw = nbytes / (time.perf_counter() - t)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        pos = 0
        while pos < nbytes:
            pos += len(os.pread(fd, block, pos))
        read_bw = nbytes / (time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return read_bw, write_bw
