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
    if nbytes < 1 or block < 1:
        raise ValueError(f"measure_disk needs nbytes and block >= 1, got {nbytes} and {block}")
    buf = os.urandom(block)
    fd, path = tempfile.mkstemp(prefix=".rewriter-probe-", dir=directory)
    try:
        t = time.perf_counter()
        written = 0
        while written < nbytes:
            # The last block may be partial: write exactly nbytes, so the read loop below ends.
            written += os.write(fd, memoryview(buf)[: min(block, nbytes - written)])
        os.fsync(fd)
        write_bw = nbytes / (time.perf_counter() - t)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        pos = 0
        while pos < nbytes:
            got = len(os.pread(fd, min(block, nbytes - pos), pos))
            if not got:
                raise OSError(f"{path}: the probe file ended at {pos} of {nbytes} bytes")
            pos += got
        read_bw = nbytes / (time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return read_bw, write_bw
