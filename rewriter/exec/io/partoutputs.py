"""One worker's share of a large output shard that several workers write at once: positioned
writes into one preallocated file (:class:`PartOutput`), or numbered parts of one multipart
upload (:class:`MultipartPart`). Each hashes its range as it writes it. Destinations
(:mod:`rewriter.exec.dest.local`, :mod:`rewriter.exec.dest.objects`) create them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
from collections.abc import Callable
from typing import Any

from rewriter.exec.io.fileio import pwrite_all, write_errors_are_clear
from rewriter.exec.io.outputs import start_writeback, wait_written

#: Sends one numbered part of a multipart upload (its bytes as a :class:`PartBody`); returns its
#: ``{"PartNumber", "ETag"}``.
SendPart = Callable[[int, "PartBody"], dict[str, Any]]


class PartBody(io.RawIOBase):
    """A read-only, seekable stream over a part's bytes, sent as an upload's request body.

    A ``bytes``-like body costs the sending process two to three times the part more (measured
    with botocore and aiohttp: the unsent rest of a large body is copied into the transport's
    buffer, and more); a stream is read in small chunks and re-read from the start on a retry,
    so sending a part costs no more than the part's own buffer.
    """

    def __init__(self, data: memoryview):
        super().__init__()
        self._view = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._view)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        b[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        out = bytes(self._view[self._pos:end]) if end > self._pos else b""
        self._pos = max(self._pos, end)
        return out


class PartOutput:
    """A byte range of a preallocated file, written with positioned writes by one worker, who
    hashes it as it writes (bytes the kernel copied, from the page cache right after)."""

    zero_copy_capable = True

    def __init__(self, path: str, start: int):
        self.final = path
        self.fd = os.open(path, os.O_WRONLY)
        self._rfd = os.open(path, os.O_RDONLY)
        self.start = self.pos = self._flushed = start
        self._h = hashlib.sha256()
        self.parts: list[dict[str, Any]] = []  # positioned writes send no upload parts

    def write(self, data: bytes | memoryview) -> None:
        self.pos = pwrite_all(self.fd, data, self.pos, self.final)
        self._h.update(data)
        self._flushed = start_writeback(self.fd, self._flushed, self.pos)

    def copied(self, n: int) -> None:
        at, self.pos = self.pos, self.pos + n
        while at < self.pos:
            chunk = os.pread(self._rfd, min(self.pos - at, 8 << 20), at)
            if not chunk:
                raise OSError(errno.EIO, f"{self.final}: shorter than written")
            self._h.update(chunk)
            at += len(chunk)
        self._flushed = start_writeback(self.fd, self._flushed, self.pos)

    def commit(self, drop_cache: bool = False) -> str:
        """Wait for this part's bytes to reach the disk (each writer its own range, at once;
        the publisher's fsync then finds little left to write), close; returns their sha256."""
        with write_errors_are_clear(self.final):
            wait_written(self.fd, self.start, self.pos)
        self.abort()
        return self._h.hexdigest()

    def abort(self) -> None:
        for fd in (self.fd, self._rfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd = self._rfd = -1


class MultipartPart:
    """Sends a contiguous run of an object's bytes as numbered parts of a multipart upload.

    Several workers fill one object: each takes a range starting at a multiple of ``part_bytes``
    and sends parts ``start // part_bytes + 1``, ... The object appears only when the upload is
    completed (by the destination), so a shard stays whole or absent. Memory: one buffer of
    one part, allocated once and sent from where it is (:class:`PartBody`), never copied or
    grown. The range is hashed as it is written.
    """

    zero_copy_capable = False

    def __init__(self, send: SendPart, start: int, part_bytes: int):
        self.send = send
        self.part_bytes = part_bytes
        self.number = start // part_bytes + 1
        self.buf = bytearray()  # allocated by the first write: a resumed or empty range needs none
        self.filled = 0
        self.parts: list[dict[str, Any]] = []
        self.pos = start
        self._h = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._h.update(view)
        self.pos += len(view)
        if len(view) and not self.buf:
            self.buf = bytearray(self.part_bytes)
        while len(view):
            take = min(len(view), self.part_bytes - self.filled)
            self.buf[self.filled:self.filled + take] = view[:take]
            self.filled += take
            view = view[take:]
            if self.filled == self.part_bytes:
                self._send()

    def _send(self) -> None:
        self.parts.append(self.send(self.number, PartBody(memoryview(self.buf)[:self.filled])))
        self.filled = 0
        self.number += 1

    def copied(self, n: int) -> None:
        raise AssertionError("multipart uploads have no zero-copy path")

    def commit(self, drop_cache: bool = False) -> str:
        """Send what is left; returns the sha256 of this range's bytes."""
        if self.filled:
            self._send()
        self.buf = bytearray()
        return self._h.hexdigest()

    def abort(self) -> None:
        self.buf, self.filled = bytearray(), 0
