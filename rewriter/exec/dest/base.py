"""What every destination does, and what only some can.

:class:`Destination` is the interface the executors write through: three operations differ for
each kind of storage (creating an output, publishing a small file, deciding whether a journaled
shard is really there, and the folder's lifecycle around a run); the rest is shared.
:class:`ShardParts` is the optional capability of writing one large shard in parts from several
workers at once (a preallocated file on a shared filesystem, a multipart upload on S3).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any

from core.storage import Storage
from rewriter.exec.dest.lock import STATE_DIR
from rewriter.exec.io import MultipartPart, Output, PartOutput
from rewriter.exec.options import DEFAULT_BUFFER_BYTES

TMP_DIR = f"{STATE_DIR}/tmp"


class Destination(ABC):
    """The output location of a run."""

    #: Whether ``copy_file_range`` can write into this destination's outputs.
    zero_copy = False

    def __init__(self, storage: Storage):
        self.storage = storage

    @abstractmethod
    def create_output(self, name: str, buffer_bytes: int, hash_trailing: bool = False) -> Output:
        """A new output ``name``, published by its ``commit`` and discarded by its ``abort``."""

    @abstractmethod
    def put_bytes(self, name: str, data: bytes) -> None:
        """Publish a small file whole: atomically, or as one object."""

    @abstractmethod
    def shard_done(self, name: str, size: object, sha256: object, buffer_bytes: int) -> bool:
        """Whether ``name`` is the shard a journal recorded (its size, and its hash where a
        crash could have left a torn file under the final name)."""

    @property
    def url(self) -> str:
        return self.storage.url

    def describe(self, name: str) -> str:
        return self.storage.describe(name)

    def exists(self, name: str) -> bool:
        return self.storage.exists(name)

    def list_files(self) -> list[str]:
        """Every file already in the destination (none when it does not exist yet)."""
        return self.storage.list_files() if self.storage.exists() else []

    def read_all(self, name: str) -> bytes:
        return self.storage.read_all(name)

    def remove(self, name: str) -> None:
        self.storage.remove(name)

    def hash(self, name: str, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> str:
        """sha256 of file ``name``, streamed with a bounded buffer."""
        h = hashlib.sha256()
        with self.storage.open(name, "rb", block_size=buffer_bytes) as f:
            while chunk := f.read(buffer_bytes):
                h.update(chunk)
        return h.hexdigest()

    def copy_small_file(self, src: Storage, name: str, buffer_bytes: int, dst_name: str | None = None) -> None:
        """Copy a non-tensor file (tokenizer, generation config…) in bounded chunks, atomically,
        to ``dst_name`` (default: the same name)."""
        size = src.size(name)
        out = dst_name or name
        if size <= buffer_bytes:
            self.put_bytes(out, src.read_all(name))
            return
        sink = self.create_output(out, buffer_bytes)
        try:
            for start in range(0, size, buffer_bytes):
                sink.write(src.read_range(name, start, min(size, start + buffer_bytes)))
            sink.commit()
        except BaseException:
            sink.abort()
            raise

    @abstractmethod
    def check_folder(self) -> None:
        """Raise when the destination cannot be a folder (a file, or below one)."""

    @abstractmethod
    def is_new(self) -> bool:
        """Whether a run would create the destination folder (and so may remove it again)."""

    @abstractmethod
    def clear_temporary(self) -> None:
        """Remove temporary files of killed runs; call with the destination's lock held."""

    @abstractmethod
    def drop_empty_state(self, created: bool) -> None:
        """After a failed or nothing-to-do run, remove run state that holds nothing to resume."""

    def remove_state(self) -> None:
        """Remove ``DST/.rewriter`` once the output is complete."""
        if self.storage.exists(STATE_DIR):
            self.storage.remove(STATE_DIR, recursive=True)


class ShardParts(ABC):
    """A destination that takes a large shard in parts written by several workers at once.

    ``begin_parts`` returns a handle for this attempt at the shard (a uniquely named file, or an
    upload id); each worker writes and hashes its ``part_output(handle, ...)``; ``commit_parts``
    publishes the whole shard without reading it back.
    """

    @abstractmethod
    def begin_parts(self, name: str, size: int, plan_digest: str) -> str: ...

    @abstractmethod
    def part_output(self, name: str, handle: str, start: int, upload_part_bytes: int) -> PartOutput | MultipartPart: ...

    @abstractmethod
    def commit_parts(self, name: str, size: int, handle: str, uploaded: list[dict[str, Any]],
                     buffer_bytes: int, drop_cache: bool = False) -> None: ...

    @abstractmethod
    def abort_parts(self, name: str, handle: str) -> None:
        """Discard a shard whose parts will not all be written; never raises."""

    @abstractmethod
    def parts_kept(self, name: str, handle: str, size: int) -> dict[int, str] | None:
        """What survives of attempt ``handle`` (None: nothing): upload part number -> ETag, or {} (a file)."""

    @abstractmethod
    def leftover_parts(self) -> list[tuple[str, str]]:
        """``(name, handle)`` of every unfinished attempt at a shard in parts (any run's)."""

    @abstractmethod
    def parts_done(self, name: str, size: object, parts: list[Any], buffer_bytes: int) -> bool:
        """Whether ``name`` is the shard journaled as ``parts`` (their hashes, or its size)."""

    @abstractmethod
    def part_sha256(self, handle: str, start: int, length: int, buffer_bytes: int) -> str | None:
        """sha256 of bytes already in attempt ``handle``; None where they cannot be read back."""


def leftover_parts(dst: Destination) -> list[tuple[str, str]]:
    """The unfinished attempts at shards in parts in ``dst`` (none where it takes no parts)."""
    return dst.leftover_parts() if isinstance(dst, ShardParts) else []


def abort_parts(dst: Destination, name: str, handle: str) -> None:
    if isinstance(dst, ShardParts):
        dst.abort_parts(name, handle)
