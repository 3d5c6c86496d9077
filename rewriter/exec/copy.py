"""Moving byte ranges from source shards to an output with bounded memory.

Two paths:

* **zero-copy** (source and destination local): ``os.copy_file_range`` in a loop; the data never
  enters this process. A kernel that refuses (EXDEV, EOPNOTSUPP, ENOSYS, EINVAL, EBADF) switches
  the rest of the run to the buffered path.
* **buffered** (anything else): ranged reads of at most ``buffer_bytes`` into one reused
  buffer, written sequentially.

Outputs (:mod:`rewriter.exec.outputs`) hash what they are given as it is written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from planners.plan import Segment
from rewriter.core.errors import CheckpointError, DestinationFullError, ExecutionError
from rewriter.core.storage import Storage

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
_ZERO_COPY_REFUSALS = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
_COPY_CHUNK = 64 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)
#: Mode of every output file (before the umask): readable by all, like files ``cp`` makes.
OUTPUT_MODE = 0o644
DEFAULT_BUFFER_BYTES = 16 << 20
#: How far ahead of the copy the source ranges are requested (page cache, not process memory),
#: in pieces of at most PREFETCH_PIECE.
PREFETCH_WINDOW = 128 << 20
PREFETCH_PIECE = 32 << 20


class Output(Protocol):
    """Where copied bytes go (:mod:`rewriter.exec.outputs`)."""

    #: True for a local file the kernel can copy into (then ``fd`` and ``final`` exist).
    zero_copy_capable: bool
    pos: int

    def write(self, data: bytes | memoryview) -> None: ...

    def copied(self, n: int) -> None:
        """``n`` bytes were appended by the kernel (copy_file_range)."""

    def commit(self, drop_cache: bool = False) -> str: ...

    def abort(self) -> None: ...


@dataclass
class CopyStats:
    bytes_read: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    copy_seconds: float = 0.0
    zero_copy_bytes: int = 0


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


class RangeCopier:
    """Copies source byte ranges into an output, choosing zero-copy when both ends are local."""

    def __init__(self, src: Storage, buffer_bytes: int, stats: CopyStats, progress: Progress | None, zero_copy: bool = True):
        self.src = src
        self.buffer = bytearray(buffer_bytes)
        self.stats = stats
        self.progress = progress
        self.zero_copy = zero_copy and src.is_local

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

    def _short(self, shard: str, offset: int) -> ExecutionError:
        return ExecutionError(
            f"{self.src.describe(shard)}: ends at byte {offset:,}, before the planned range; "
            f"the file is truncated or changed since planning"
        )

    def _copy_kernel(self, shard: str, offset: int, length: int, out: Output) -> int:
        dst_fd, where = out.fd, out.final  # type: ignore[attr-defined]  # zero_copy_capable outputs
        fd = self.src.fd(shard)
        done = 0
        while done < length:
            chunk = min(_COPY_CHUNK, length - done)
            t = time.perf_counter()
            try:
                with write_errors_are_clear(where):
                    n = os.copy_file_range(fd, dst_fd, chunk, offset + done, out.pos)
            except OSError as e:
                if e.errno not in _ZERO_COPY_REFUSALS:
                    raise
                self.zero_copy = False
                return done
            self.stats.copy_seconds += time.perf_counter() - t
            if n == 0:
                raise self._short(shard, offset + done)
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
    """Copy ops in order, keeping about PREFETCH_WINDOW bytes of upcoming source ranges requested."""
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
