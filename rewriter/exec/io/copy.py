"""Moving byte ranges from source shards to an output with bounded memory.

Two paths, each with several requests in flight (:class:`IOOptions`):

* **zero-copy** (source and destination local): positioned ``os.copy_file_range`` of each piece
  (at most 32 MiB) straight to its offset in the output, ``segment_threads`` at once; the data
  never enters this process, and the output's hash follows the contiguous prefix written. A
  kernel that refuses (EXDEV, EOPNOTSUPP, ENOSYS, EINVAL, EBADF) gets that piece copied through a
  buffer and switches the rest of the run to the buffered path.
* **buffered** (anything else): the ranges become requests (:func:`planners.reads.plan_reads`:
  large ones split, near neighbours merged up to ``max_gap``), fetched by a few threads with at
  most ``inflight_requests`` requests and ``inflight_bytes`` bytes in flight, and written in
  order while the next ones are read. Local sources read into a small ring of buffers.

``inflight_bytes=0`` selects the sequential path of earlier versions: one request (or one
``copy_file_range``) at a time, at most ``buffer_bytes`` each.

Outputs (:mod:`rewriter.exec.io.outputs`) hash what they are given as it is written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from core.errors import CheckpointError, ExecutionError
from core.storage import Storage
from planners.tensors import Segment
from rewriter.exec.io.copy_paths import (  # IOOptions, CopyStats re-exported
    COPY_CHUNK,
    ZERO_COPY_REFUSALS,
    CopyStats,
    IOOptions,
    copy_positioned,
    copy_windowed,
)
from rewriter.exec.io.fileio import write_errors_are_clear
from rewriter.exec.io.streams import InFlight

__all__ = ["CopyStats", "IOOptions", "RangeCopier", "copy_segments"]

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
#: How far ahead of the copy the source ranges are requested (page cache, not process memory),
#: in pieces of at most PREFETCH_PIECE.
PREFETCH_WINDOW = 128 << 20
PREFETCH_PIECE = 32 << 20
MiB = 1 << 20


class Output(Protocol):
    """Where copied bytes go (:mod:`rewriter.exec.io.outputs`)."""

    #: True for a local file the kernel can copy into (then ``fd`` and ``final`` exist).
    zero_copy_capable: bool
    pos: int

    def write(self, data: bytes | memoryview) -> None: ...

    def copied(self, n: int) -> None:
        """``n`` bytes were appended by the kernel (copy_file_range)."""

    def commit(self, drop_cache: bool = False) -> str: ...

    def abort(self) -> None: ...


class RangeCopier:
    """Copies source byte ranges into an output, choosing zero-copy when both ends are local."""

    def __init__(self, src: Storage, buffer_bytes: int, stats: CopyStats, progress: Progress | None,
                 zero_copy: bool = True, io: IOOptions | None = None):
        self.src = src
        self.buffer_bytes = buffer_bytes
        self.io = io or IOOptions()
        # The sequential path's one buffer; the concurrent paths allocate their own per shard.
        self.buffer = bytearray(buffer_bytes if self.io.sequential else 0)
        self.stats = stats
        self.progress = progress
        self.zero_copy = zero_copy and src.is_local
        self.counts = InFlight()  # of the last concurrent copy (tests read its maxima)

    def close(self) -> None:
        self.src.close()

    def prefetch(self, shard: str, offset: int, length: int) -> None:
        """Ask for a range that will be copied soon (local sources only; no-op elsewhere)."""
        self.src.prefetch(shard, offset, length)

    def copy(self, shard: str, offset: int, length: int, out: Output) -> None:
        done = 0
        if self.zero_copy and out.zero_copy_capable:
            done = self._copy_kernel(shard, offset, length, out)
        if done < length:
            self._copy_buffered(shard, offset + done, length - done, out)

    def short(self, shard: str, offset: int) -> ExecutionError:
        return ExecutionError(
            f"{self.src.describe(shard)}: ends at byte {offset:,}, before the planned range; "
            f"the file is truncated or changed since planning"
        )

    def _copy_kernel(self, shard: str, offset: int, length: int, out: Output) -> int:
        dst_fd, where = out.fd, out.final  # type: ignore[attr-defined]  # zero_copy_capable outputs
        fd = self.src.fd(shard)
        done = 0
        while done < length:
            chunk = min(COPY_CHUNK, length - done)
            t = time.perf_counter()
            try:
                with write_errors_are_clear(where):
                    n = os.copy_file_range(fd, dst_fd, chunk, offset + done, out.pos)
            except OSError as e:
                if e.errno not in ZERO_COPY_REFUSALS:
                    raise
                self.zero_copy = False
                return done
            self.stats.copy_seconds += time.perf_counter() - t
            if n == 0:
                raise self.short(shard, offset + done)
            done += n
            out.copied(n)
            self.stats.bytes_read += n
            self.stats.zero_copy_bytes += n
            self.src.counter.add(n)
            if self.progress:
                self.progress(n)
        return done

    def _copy_buffered(self, shard: str, offset: int, length: int, out: Output) -> None:
        chunks = self.src.iter_range(shard, offset, offset + length, self.buffer)
        while True:
            t = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except CheckpointError as e:
                raise ExecutionError(str(e)) from None
            t2 = time.perf_counter()
            self.stats.read_seconds += t2 - t
            out.write(chunk)
            self.stats.write_seconds += time.perf_counter() - t2
            self.stats.bytes_read += len(chunk)
            if self.progress:
                self.progress(len(chunk))


def copy_segments(copier: RangeCopier, ops: Sequence[Segment], sink: Output) -> None:
    """Copy ops in order into ``sink`` by the path :class:`IOOptions` chooses."""
    if copier.io.sequential:
        _copy_sequential(copier, ops, sink)
    elif copier.zero_copy and sink.zero_copy_capable:
        copy_positioned(copier, ops, sink)
    else:
        copy_windowed(copier, ops, sink)


def _copy_sequential(copier: RangeCopier, ops: Sequence[Segment], sink: Output) -> None:
    """One range at a time, keeping about PREFETCH_WINDOW bytes of upcoming ranges requested."""
    pieces: list[Segment] = []
    for op in ops:
        if op.data is not None or op.length <= PREFETCH_PIECE:
            pieces.append(op)
            continue
        for start in range(0, op.length, PREFETCH_PIECE):
            pieces.append(Segment(op.shard, op.offset + start, min(PREFETCH_PIECE, op.length - start)))
    ahead = 0  # bytes requested beyond the piece being copied
    j = 0
    for i, piece in enumerate(pieces):
        if j <= i:
            j, ahead = i, 0
        while j < len(pieces) and ahead < PREFETCH_WINDOW:
            nxt = pieces[j]
            if nxt.data is None:
                copier.prefetch(nxt.shard, nxt.offset, nxt.length)
            ahead += nxt.length
            j += 1
        ahead -= piece.length
        if piece.data is not None:
            sink.write(piece.data)
        else:
            copier.copy(piece.shard, piece.offset, piece.length, sink)


