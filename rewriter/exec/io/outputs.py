"""Where copied bytes go: output files and uploads, each hashed (sha256) as it is written.

* :class:`LocalOutput`: a temporary file renamed into place when complete; on the zero-copy path
  a trailing thread re-reads what was just written from the page cache, so hashing overlaps
  copying.
* :class:`RemoteOutput`: an object written through fsspec, published only when complete.
* one worker's share of a large shard that several workers write at once:
  :mod:`rewriter.exec.io.partoutputs`.

Destinations (:mod:`rewriter.exec.dest.destination`) choose and create them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import uuid
from typing import Any, BinaryIO

from fsspec.spec import AbstractBufferedFile

from core.storage import Storage
from rewriter.exec.io.fileio import OUTPUT_MODE, fsync_dir, pwrite_all, write_errors_are_clear

log = logging.getLogger(__name__)

def _libc_sync_file_range():
    """``sync_file_range(2)`` through ctypes (Linux), or None: starts writeback early."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT = 1 | 2 | 4  # wait for writes under way, write, wait for those
#: Start writing back dirty output pages every this many bytes, so the final fsync is short and
#: disk writes overlap the copy instead of following it.
WRITEBACK_BYTES = 32 << 20


def start_writeback(fd: int, flushed: int, pos: int) -> int:
    """Start writing back ``[flushed, pos)`` once it is WRITEBACK_BYTES long; returns the new
    start of what is not yet sent to the disk."""
    if _SYNC_FILE_RANGE is not None and pos - flushed >= WRITEBACK_BYTES:
        _SYNC_FILE_RANGE(fd, flushed, pos - flushed, _SYNC_FILE_RANGE_WRITE)
        return pos
    return flushed


def wait_written(fd: int, start: int, end: int) -> None:
    """Write ``[start, end)`` of ``fd`` to the disk and wait for it (``fsync`` where the kernel
    cannot sync one range)."""
    if _SYNC_FILE_RANGE is None:
        os.fsync(fd)
    elif _SYNC_FILE_RANGE(fd, start, end - start, _SYNC_FILE_RANGE_WAIT) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class TrailingHasher:
    """sha256 of a file being written, computed by a thread that follows the writer."""

    def __init__(self, path: str, buffer_bytes: int):
        self._fd = os.open(path, os.O_RDONLY)
        self._buf = bytearray(min(buffer_bytes, 8 << 20))
        self._h = hashlib.sha256()
        self._done = 0
        self._target = 0
        self._closed = False
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._fd_open = True
        self._thread = threading.Thread(target=self._run, name="trailing-hasher", daemon=True)
        self._thread.start()

    def advance(self, upto: int) -> None:
        with self._cv:
            self._target = upto
            self._cv.notify()

    def _run(self) -> None:
        view = memoryview(self._buf)
        try:
            while True:
                with self._cv:
                    while self._done >= self._target and not self._closed:
                        self._cv.wait()
                    target, closed = self._target, self._closed
                if self._done >= target and closed:
                    return
                while self._done < target:
                    n = os.preadv(self._fd, [view[: min(len(view), target - self._done)]], self._done)
                    if n <= 0:
                        raise OSError(errno.EIO, "output file shorter than written")
                    self._h.update(view[:n])
                    self._done += n
        except BaseException as e:  # surfaced by finish()
            self._error = e

    def _close(self) -> None:
        # Once only: a second close could hit a descriptor number reused by another file.
        if self._fd_open:
            self._fd_open = False
            os.close(self._fd)

    def finish(self) -> str:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        self._close()
        if self._error:
            raise self._error
        return self._h.hexdigest()

    def abort(self) -> None:
        """Stop and close; safe after :meth:`finish` and when called twice."""
        with self._cv:
            self._closed = True
            self._target = self._done
            self._cv.notify()
        self._thread.join()
        self._close()


class LocalOutput:
    """An output file written under a temporary name and renamed into place when complete."""

    zero_copy_capable = True

    def __init__(self, dst: Storage, name: str, tmp_dir: str, buffer_bytes: int, hash_trailing: bool):
        self.final = dst.local_path(name)
        os.makedirs(tmp_dir, exist_ok=True)
        self.tmp = os.path.join(tmp_dir, f"{os.path.basename(name)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
        with write_errors_are_clear(self.final):
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, OUTPUT_MODE)
        self._fd_open = True
        self.pos = 0
        self._hasher = TrailingHasher(self.tmp, buffer_bytes) if hash_trailing else None
        self._inline = None if hash_trailing else hashlib.sha256()
        self._flushed = 0

    def write(self, data: bytes | memoryview) -> None:
        self.pos = pwrite_all(self.fd, data, self.pos, self.final)
        if self._inline is not None:
            self._inline.update(data)
        if self._hasher:
            self._hasher.advance(self.pos)
        self._writeback()

    def copied(self, n: int) -> None:
        """``n`` bytes were appended by the kernel (copy_file_range)."""
        self.pos += n
        if self._hasher:
            self._hasher.advance(self.pos)
        else:
            raise AssertionError("zero-copy writes need the trailing hasher")
        self._writeback()

    def _writeback(self) -> None:
        self._flushed = start_writeback(self.fd, self._flushed, self.pos)

    def commit(self, drop_cache: bool = False) -> str:
        digest = self._hasher.finish() if self._hasher else self._inline.hexdigest()  # type: ignore[union-attr]
        with write_errors_are_clear(self.final):
            os.fsync(self.fd)
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._close()
        os.replace(self.tmp, self.final)
        fsync_dir(os.path.dirname(self.final))
        return digest

    def _close(self) -> None:
        if self._fd_open:
            self._fd_open = False
            os.close(self.fd)

    def abort(self) -> None:
        """Close and remove the temporary file; never raises over the error being handled."""
        try:
            if self._hasher:
                self._hasher.abort()
        finally:
            try:
                self._close()
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tmp)


class RemoteOutput:
    """An output object written straight to its final name through fsspec.

    Object stores publish an object only when its (multipart) upload completes, so a shard is
    whole or absent; on failure the upload is discarded.
    """

    zero_copy_capable = False

    def __init__(self, dst: Storage, name: str, open_options: dict[str, Any]):
        self.dst = dst
        self.name = name
        self.f: BinaryIO = dst.open(name, "wb", **open_options)
        self.pos = 0
        self._h = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        with write_errors_are_clear(self.dst.describe(self.name)):
            self.f.write(data)
        self._h.update(data)
        self.pos += len(data)

    def copied(self, n: int) -> None:
        raise AssertionError("remote outputs have no zero-copy path")

    def commit(self, drop_cache: bool = False) -> str:
        self.f.close()
        return self._h.hexdigest()

    def abort(self) -> None:
        discard = getattr(self.f, "discard", None)
        try:
            if discard is not None:
                discard()  # s3fs, gcsfs: the upload is dropped and never becomes an object
            if isinstance(self.f, AbstractBufferedFile):
                self.f.closed = True  # discarded: nothing left to flush or complete
            else:
                self.f.close()
            if self.dst.exists(self.name):  # stores that show an object while it is written (memory://)
                self.dst.remove(self.name)
        except Exception as e:  # the object was never completed; the error being handled matters more
            log.warning("could not discard the unfinished upload of %s (%s: %s); the object store "
                        "may keep its parts until its lifecycle rules remove them",
                        self.dst.describe(self.name), type(e).__name__, e)
