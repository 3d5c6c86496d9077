"""One worker's share of a large output shard that several workers write at once: positioned
writes into one preallocated file (:class:`PartOutput`), or numbered parts of one multipart
upload (:class:`MultipartPart`). Each hashes its range as it writes it. Destinations
(:mod:`rewriter.exec.dest.local`, :mod:`rewriter.exec.dest.objects`) create them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable
from typing import Any

from rewriter.exec.io.fileio import pwrite_all, write_errors_are_clear
from rewriter.exec.io.outputs import start_writeback, wait_written

#: Sends one numbered part of a multipart upload; returns its ``{"PartNumber", "ETag"}``.
SendPart = Callable[[int, bytearray], dict[str, Any]]


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
    completed (by the destination), so a shard stays whole or absent. Memory: one part (the
    buffer is sent as it is, never copied). The range is hashed as it is written.
    """

    zero_copy_capable = False

    def __init__(self, send: SendPart, start: int, part_bytes: int):
        self.send = send
        self.part_bytes = part_bytes
        self.number = start // part_bytes + 1
        self.buf = bytearray()
        self.parts: list[dict[str, Any]] = []
        self.pos = start
        self._h = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._h.update(view)
        self.pos += len(view)
        while len(view):
            take = min(len(view), self.part_bytes - len(self.buf))
            self.buf += view[:take]
            view = view[take:]
            if len(self.buf) == self.part_bytes:
                self._send()

    def _send(self) -> None:
        body, self.buf = self.buf, bytearray()
        self.parts.append(self.send(self.number, body))
        self.number += 1

    def copied(self, n: int) -> None:
        raise AssertionError("multipart uploads have no zero-copy path")

    def commit(self, drop_cache: bool = False) -> str:
        """Send what is left; returns the sha256 of this range's bytes."""
        if self.buf:
            self._send()
        return self._h.hexdigest()

    def abort(self) -> None:
        self.buf = bytearray()
