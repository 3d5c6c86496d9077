"""Moving byte ranges from source shards to an output file with bounded memory.

Two paths:

* **zero-copy** (source and destination local): ``os.copy_file_range`` in a loop; the data never
  enters this process. A kernel that refuses (EXDEV, EOPNOTSUPP, ENOSYS, EINVAL, EBADF) switches
  the rest of the run to the buffered path.
* **buffered** (anything else): ranged reads of at most ``buffer_bytes`` into one reused
  buffer, written sequentially.

Output files are hashed (sha256) as they are written; on the zero-copy path a trailing thread
re-reads what was just written from the page cache, so hashing overlaps copying.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from rewriter.errors import CheckpointError, ExecutionError
from rewriter.storage import Storage

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
_ZERO_COPY_REFUSALS = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
_COPY_CHUNK = 64 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)
#: Mode of every output file (before the umask): readable by all, like files ``cp`` makes.
OUTPUT_MODE = 0o644


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
            raise ExecutionError(
                f"{where}: no space left on the destination ({e.strerror}); nothing was published: "
                f"free space and run the same command again to resume"
            ) from None
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
#: Start writing back dirty output pages every this many bytes, so the final fsync is short and
#: disk writes overlap the copy instead of following it.
WRITEBACK_BYTES = 32 << 20


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
        if _SYNC_FILE_RANGE is not None and self.pos - self._flushed >= WRITEBACK_BYTES:
            _SYNC_FILE_RANGE(self.fd, self._flushed, self.pos - self._flushed, _SYNC_FILE_RANGE_WRITE)
            self._flushed = self.pos

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

    def __init__(self, dst: Storage, name: str, block_bytes: int):
        self.dst = dst
        self.name = name
        kwargs: dict[str, Any] = {}
        if "s3" in (dst.fs.protocol if isinstance(dst.fs.protocol, tuple) else (dst.fs.protocol,)):
            kwargs["block_size"] = max(block_bytes, 5 << 20)
        self.f: BinaryIO = dst.fs.open(dst.path(name), "wb", **kwargs)
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
                discard()
                self.f.closed = True  # type: ignore[misc]  # discarded: nothing left to flush or complete
            else:
                self.f.close()
                self.dst.fs.rm(self.dst.path(self.name))
        except Exception as e:  # the object was never completed; the error being handled matters more
            log.warning("could not discard the unfinished upload of %s (%s: %s); the object store "
                        "may keep its parts until its lifecycle rules remove them",
                        self.dst.describe(self.name), type(e).__name__, e)


class PartOutput:
    """A byte range of a preallocated file, written with positioned writes by one worker.

    Several workers fill disjoint parts of one large output shard (part 0 holds the header);
    whoever created the file at its full size fsyncs, hashes and renames it once every part is
    done.
    """

    zero_copy_capable = True

    def __init__(self, path: str, start: int):
        self.final = path
        self.fd = os.open(path, os.O_WRONLY)
        self.pos = start

    def write(self, data: bytes | memoryview) -> None:
        self.pos = pwrite_all(self.fd, data, self.pos, self.final)

    def copied(self, n: int) -> None:
        self.pos += n

    def commit(self, drop_cache: bool = False) -> str:
        os.close(self.fd)
        return ""

    def abort(self) -> None:
        os.close(self.fd)


class MultipartPart:
    """Sends a contiguous run of an object's bytes as numbered parts of a multipart upload.

    Several workers fill one object: each takes a range starting at a multiple of ``part_bytes``
    and sends parts ``start // part_bytes + 1``, ... The object appears only when the upload is
    completed (:func:`complete_multipart`), so a shard stays whole or absent. Memory: one part.
    """

    zero_copy_capable = False

    def __init__(self, dst: Storage, name: str, upload_id: str, start: int, part_bytes: int):
        self.dst = dst
        self.bucket, self.key, _ = dst.fs.split_path(dst.path(name))
        self.upload_id = upload_id
        self.part_bytes = part_bytes
        self.number = start // part_bytes + 1
        self.buf = bytearray()
        self.parts: list[dict[str, Any]] = []
        self.pos = start

    def write(self, data: bytes | memoryview) -> None:
        self.buf += data
        self.pos += len(data)
        while len(self.buf) >= self.part_bytes:
            self._send(bytes(self.buf[: self.part_bytes]))
            del self.buf[: self.part_bytes]

    def _send(self, body: bytes) -> None:
        r = self.dst.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                PartNumber=self.number, Body=body)
        self.parts.append({"PartNumber": self.number, "ETag": r["ETag"]})
        self.number += 1

    def copied(self, n: int) -> None:
        raise AssertionError("multipart uploads have no zero-copy path")

    def commit(self, drop_cache: bool = False) -> str:
        if self.buf:
            self._send(bytes(self.buf))
            self.buf.clear()
        return ""

    def abort(self) -> None:
        self.buf.clear()


def begin_multipart(dst: Storage, name: str) -> str:
    bucket, key, _ = dst.fs.split_path(dst.path(name))
    return str(dst.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"])


def complete_multipart(dst: Storage, name: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
    bucket, key, _ = dst.fs.split_path(dst.path(name))
    dst.fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                   MultipartUpload={"Parts": sorted(parts, key=lambda p: p["PartNumber"])})
    dst.fs.invalidate_cache()


def abort_multipart(dst: Storage, name: str, upload_id: str) -> None:
    bucket, key, _ = dst.fs.split_path(dst.path(name))
    try:
        dst.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as e:  # an unfinished upload never becomes an object; the error being handled matters more
        log.warning("could not abort multipart upload %s of %s (%s: %s); the object store may keep "
                    "its parts until its lifecycle rules remove them", upload_id, dst.describe(name),
                    type(e).__name__, e)


def supports_multipart(dst: Storage) -> bool:
    """Whether the destination is an S3-compatible store whose uploads can be sent in parts."""
    return hasattr(dst.fs, "call_s3") and hasattr(dst.fs, "split_path")


Output = LocalOutput | RemoteOutput | PartOutput | MultipartPart


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
        assert isinstance(out, (LocalOutput, PartOutput))
        fd = self.src.fd(shard)
        done = 0
        while done < length:
            chunk = min(_COPY_CHUNK, length - done)
            t = time.perf_counter()
            try:
                with write_errors_are_clear(out.final):
                    n = os.copy_file_range(fd, out.fd, chunk, offset + done, out.pos)
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
