"""The concurrent copy paths (see :mod:`rewriter.exec.io.copy`): requests fetched ahead and written
in order (buffered), and positioned zero-copy pieces several at once."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from core.errors import CheckpointError, ExecutionError
from core.storage import Storage
from planners.reads import Read, plan_reads
from planners.tensors import Segment
from rewriter.exec.io.fileio import pwrite_all, write_errors_are_clear
from rewriter.exec.io.streams import InFlight, ordered
from rewriter.exec.options import LOCAL_RING, IOOptions

ZERO_COPY_REFUSALS = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
COPY_CHUNK = 64 << 20
#: Largest piece of one positioned copy (a longer range is split so pieces go on at once).
PIECE = 32 << 20


@dataclass
class CopyStats:
    bytes_read: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    copy_seconds: float = 0.0
    zero_copy_bytes: int = 0


class Copier(Protocol):
    src: Storage
    io: IOOptions
    buffer_bytes: int
    stats: CopyStats
    progress: Callable[[int], None] | None
    zero_copy: bool
    counts: InFlight

    def prefetch(self, shard: str, offset: int, length: int) -> None: ...
    def short(self, shard: str, offset: int) -> ExecutionError: ...


class Sink(Protocol):
    pos: int

    def write(self, data: bytes | memoryview) -> None: ...
    def copied(self, n: int) -> None: ...


def copy_windowed(copier: Copier, ops: Sequence[Segment], sink: Sink) -> None:
    """Requests fetched ahead by a few threads (bounded requests and bytes), written in order."""
    src, io = copier.src, copier.io
    local = src.is_local
    request = copier.buffer_bytes
    reads = plan_reads(ops, max_gap=0 if local else io.max_gap, max_request=request)
    depth = max(1, min(LOCAL_RING if local else io.inflight_requests, io.inflight_bytes // request))
    ring: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    if local:
        for _ in range(min(depth, len(reads))):
            ring.put(bytearray(request))

    def fetch(r: Read) -> memoryview | bytes:
        if r.data is not None:
            return r.data
        if local:
            return _read_local(copier, r, ring.get_nowait())
        try:
            data = src.read_range(r.shard, r.start, r.end)
        except CheckpointError as e:
            raise ExecutionError(str(e)) from None
        if len(data) != r.size:
            raise copier.short(r.shard, r.start + len(data))
        return data

    t = time.perf_counter()
    # closing(): on an error the fetches under way finish before the output is aborted.
    results = ordered(reads, fetch, threads=depth, max_items=depth, max_bytes=max(io.inflight_bytes, request),
                      size=lambda r: r.size if r.data is None else 0, counts=copier.counts)
    with contextlib.closing(results):
        _write_in_order(copier, results, sink, ring if local else None, t)


def _write_in_order(copier: Copier, results: Iterable[tuple[Read, memoryview | bytes]], sink: Sink,
                    ring: queue.SimpleQueue[bytearray] | None, t: float) -> None:
    for r, data in results:
        t2 = time.perf_counter()
        copier.stats.read_seconds += t2 - t
        for off, n in r.slices:
            sink.write(memoryview(data)[off:off + n])
        t = time.perf_counter()
        copier.stats.write_seconds += t - t2
        if r.data is None:
            copier.stats.bytes_read += r.size
            if ring is not None:
                ring.put(data.obj)  # type: ignore[union-attr,arg-type]  # the ring's buffer, free again
        if copier.progress:
            copier.progress(r.wanted)


def _read_local(copier: Copier, r: Read, buf: bytearray) -> memoryview:
    view = memoryview(buf)[: r.size]
    fd = copier.src.fd(r.shard)
    done = 0
    while done < r.size:
        n = os.preadv(fd, [view[done:]], r.start + done)
        if n == 0:
            raise copier.short(r.shard, r.start + done)
        done += n
    copier.src.counter.add(done)
    return view


def copy_positioned(copier: Copier, ops: Sequence[Segment], sink: Sink) -> None:
    """Positioned copy_file_range of each piece to its output offset, several at once; the
    output learns of the contiguous prefix as pieces complete in order."""
    src = copier.src
    dst_fd, where = sink.fd, sink.final  # type: ignore[attr-defined]  # zero_copy_capable outputs
    reads = plan_reads(ops, max_gap=0, max_request=PIECE)
    at, pos = [], sink.pos
    for r in reads:
        at.append(pos)
        pos += r.size
    fds = {r.shard: src.fd(r.shard) for r in reads if r.data is None}

    def work(i: int) -> int:
        r = reads[i]
        return 0 if r.data is not None else _kernel_copy(copier, fds[r.shard], r, dst_fd, at[i], where)

    # Wall-clock time of the copies, not their sum over the threads: a report's copy seconds
    # stay within its elapsed seconds.
    t = time.perf_counter()
    threads = max(1, copier.io.segment_threads)
    results = ordered(range(len(reads)), work, threads=threads, max_items=2 * threads, max_bytes=2 * threads * PIECE,
                      size=lambda i: reads[i].size, counts=copier.counts,
                      on_submit=lambda i: copier.prefetch(reads[i].shard, reads[i].start, reads[i].size)
                      if reads[i].data is None else None)
    # closing(): on an error no copy into the output is under way once this returns.
    try:
        with contextlib.closing(results):
            _advance_in_order(copier, reads, results, sink)
    finally:
        copier.stats.copy_seconds += time.perf_counter() - t


def _advance_in_order(copier: Copier, reads: list[Read], results: Iterable[tuple[int, int]], sink: Sink) -> None:
    for i, kernel_bytes in results:
        r = reads[i]
        if r.data is not None:
            sink.write(r.data)  # the prefix ends here, so it is written at its offset
        else:
            sink.copied(r.size)
            copier.stats.bytes_read += r.size
            copier.stats.zero_copy_bytes += kernel_bytes
            copier.src.counter.add(r.size)
        if copier.progress:
            copier.progress(r.size)


def _kernel_copy(copier: Copier, fd: int, r: Read, dst_fd: int, dst_at: int, where: str) -> int:
    """Copy one read to ``dst_at``; returns the bytes the kernel copied (the rest went through a
    buffer after a refusal)."""
    done = 0
    while done < r.size and copier.zero_copy:
        try:
            with write_errors_are_clear(where):
                n = os.copy_file_range(fd, dst_fd, min(COPY_CHUNK, r.size - done), r.start + done, dst_at + done)
        except OSError as e:
            if e.errno not in ZERO_COPY_REFUSALS:
                raise
            copier.zero_copy = False
            break
        if n == 0:
            raise copier.short(r.shard, r.start + done)
        done += n
    kernel = done
    if done < r.size:
        buf = memoryview(bytearray(min(copier.buffer_bytes, r.size - done)))
        while done < r.size:
            n = os.preadv(fd, [buf[: r.size - done]], r.start + done)
            if n == 0:
                raise copier.short(r.shard, r.start + done)
            pwrite_all(dst_fd, buf[:n], dst_at + done, where)
            done += n
    return kernel
