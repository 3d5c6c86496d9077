"""Destinations: where a run writes, and every way it writes there.

A :class:`Destination` owns what differs between a local (or shared) filesystem and an object
store: creating outputs, publishing small files, hashing, deleting, cleaning up run state and
deciding whether a journaled shard is really done. The executors ask; they never branch on
the kind of storage. :func:`open_destination` picks the class from the URL:

* :class:`LocalDestination`: temporary names under ``DST/.rewriter/tmp``, fsync, rename; large
  shards in parts: :mod:`rewriter.exec.localparts`.
* :class:`ObjectDestination` (``memory://``, ``gs://``…): an object appears whole when its
  upload completes (nothing to rename, nothing half-written to remove).
* :class:`S3Destination`: as above, with multipart uploads of parts that several workers send."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

from rewriter.core.errors import ExecutionError
from rewriter.core.storage import Storage
from rewriter.exec.copy import (
    DEFAULT_BUFFER_BYTES,
    OUTPUT_MODE,
    Output,
    fsync_dir,
    sha256_fd,
    write_errors_are_clear,
)
from rewriter.exec.localparts import LocalParts
from rewriter.exec.lock import LOCK_NAME, STATE_DIR
from rewriter.exec.outputs import LocalOutput, RemoteOutput
from rewriter.exec.partoutputs import MultipartPart, PartBody, PartOutput

log = logging.getLogger(__name__)

TMP_DIR = f"{STATE_DIR}/tmp"


class Destination:
    """The output location of a run. Subclasses implement each operation for their storage."""

    #: Whether ``copy_file_range`` can write into this destination's outputs.
    zero_copy = False
    #: Whether a large shard can be written in parts by several workers at once.
    takes_parts = False

    def __init__(self, storage: Storage):
        self.storage = storage

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

    def create_output(self, name: str, buffer_bytes: int, hash_trailing: bool = False) -> Output:
        """A new output ``name``, published by its ``commit`` and discarded by its ``abort``."""
        raise NotImplementedError

    def put_bytes(self, name: str, data: bytes) -> None:
        """Publish a small file whole: atomically, or as one object."""
        raise NotImplementedError

    def hash(self, name: str, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> str:
        """sha256 of file ``name``, streamed with a bounded buffer."""
        h = hashlib.sha256()
        with self.storage.open(name, "rb", block_size=buffer_bytes) as f:
            while chunk := f.read(buffer_bytes):
                h.update(chunk)
        return h.hexdigest()

    def shard_done(self, name: str, size: object, sha256: object, buffer_bytes: int) -> bool:
        """Whether ``name`` is the shard a journal recorded (its size, and its hash where a
        crash could have left a torn file under the final name)."""
        raise NotImplementedError

    def copy_small_file(self, src: Storage, name: str, buffer_bytes: int, dst_name: str | None = None) -> None:
        """Copy a non-tensor file (tokenizer, generation config…) in bounded chunks, atomically,
        to ``dst_name`` (default: the same name)."""
        size, out = src.size(name), dst_name or name
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

    def check_folder(self) -> None:
        """Raise when the destination cannot be a folder (a file, or below one)."""

    def is_new(self) -> bool:
        """Whether a run would create the destination folder (and so may remove it again)."""
        return False

    def clear_temporary(self) -> None:
        """Remove temporary files of killed runs; call with the destination's lock held."""

    def remove_state(self) -> None:
        """Remove ``DST/.rewriter`` once the output is complete."""
        if self.storage.exists(STATE_DIR):
            self.storage.remove(STATE_DIR, recursive=True)

    def drop_empty_state(self, created: bool) -> None:
        """After a failed or nothing-to-do run, remove run state that holds nothing to resume."""

    # Large shards in parts (only where ``takes_parts``): begin returns a handle for this attempt (a
    # unique file, or an upload id); each worker writes and hashes its part_output(handle, ...);
    # commit publishes the whole shard without reading it back.
    def begin_parts(self, name: str, size: int, plan_digest: str) -> str:
        raise NotImplementedError

    def part_output(self, name: str, handle: str, start: int, upload_part_bytes: int) -> PartOutput | MultipartPart:
        raise NotImplementedError

    def commit_parts(self, name: str, size: int, handle: str, uploaded: list[dict[str, Any]],
                     buffer_bytes: int, drop_cache: bool = False) -> None:
        raise NotImplementedError

    def abort_parts(self, name: str, handle: str) -> None:
        """Discard a shard whose parts will not all be written; never raises."""

    def parts_kept(self, name: str, handle: str, size: int) -> dict[int, str] | None:
        """What survives of attempt ``handle`` (None: nothing): upload part number -> ETag, or {} (a file)."""
        return None

    def leftover_parts(self) -> list[tuple[str, str]]:
        """``(name, handle)`` of every unfinished attempt at a shard in parts (any run's)."""
        return []

    def parts_done(self, name: str, size: object, parts: list[Any], buffer_bytes: int) -> bool:
        """:meth:`shard_done` for a shard journaled as its parts' hashes (object stores: size)."""
        return self.exists(name) and self.storage.size(name) == size

    def part_sha256(self, handle: str, start: int, length: int, buffer_bytes: int) -> str | None:
        return None  # sha256 of bytes already in attempt ``handle``, where they can be read back


def open_destination(url: str, options: Mapping[str, Any] | None = None) -> Destination:
    """The destination at ``url`` (a local path or fsspec URL) with fsspec ``options``."""
    storage = Storage(url, options)
    if storage.entry is not None:  # a .gguf file name: the pruned GGUF model is written into a folder
        raise ExecutionError(f"{url}: the destination is a folder; give a folder name, not a .gguf file name")
    if storage.is_local:
        return LocalDestination(storage)
    if "s3" in storage.protocols:
        return S3Destination(storage)
    return ObjectDestination(storage)


class LocalDestination(LocalParts, Destination):
    zero_copy = True
    takes_parts = True

    def _path(self, name: str) -> str:
        return self.storage.local_path(name)

    def create_output(self, name: str, buffer_bytes: int, hash_trailing: bool = False) -> Output:
        os.makedirs(os.path.dirname(self._path(name)), exist_ok=True)
        return LocalOutput(self.storage, name, self._path(TMP_DIR), buffer_bytes, hash_trailing=hash_trailing)

    def put_bytes(self, name: str, data: bytes) -> None:
        final = self._path(name)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp_dir = self._path(TMP_DIR)
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = os.path.join(tmp_dir, f"{os.path.basename(name)}.{os.getpid()}.tmp")
        try:
            with write_errors_are_clear(final):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, OUTPUT_MODE)
                with open(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_dir(os.path.dirname(final))

    def hash(self, name: str, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> str:
        fd = os.open(self._path(name), os.O_RDONLY)
        try:
            return sha256_fd(fd, buffer_bytes)
        finally:
            os.close(fd)

    def shard_done(self, name: str, size: object, sha256: object, buffer_bytes: int) -> bool:
        # A rename is atomic, but a file can also be damaged after it: check the bytes.
        if not self.exists(name) or self.storage.size(name) != size:
            return False
        return self.hash(name, buffer_bytes) == sha256

    def check_folder(self) -> None:
        path = self.storage.root
        while not os.path.lexists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            what = "is a file" if path == self.storage.root else f"lies below {path}, which is a file"
            raise ExecutionError(
                f"destination {self.url} {what}, not a folder; it is never overwritten, even with "
                f"--force: choose a folder (new or empty) for the output"
            )

    def is_new(self) -> bool:
        return not os.path.exists(self.storage.root)

    def clear_temporary(self) -> None:
        shutil.rmtree(self._path(TMP_DIR), ignore_errors=True)

    def remove_state(self) -> None:
        if self.storage.exists(STATE_DIR):
            shutil.rmtree(self._path(STATE_DIR))

    def drop_empty_state(self, created: bool) -> None:
        # Only the lock and empty temporary folders are dropped; a journal stays, so that the
        # same command resumes. The folder itself goes when this run created it and it is empty.
        state = self._path(STATE_DIR)
        leftovers = [os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs]
        if leftovers and leftovers != [self._path(LOCK_NAME)]:
            return
        shutil.rmtree(state, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(self.storage.root)


class ObjectDestination(Destination):
    def _open_options(self, buffer_bytes: int) -> dict[str, Any]:
        return {}

    def create_output(self, name: str, buffer_bytes: int, hash_trailing: bool = False) -> Output:
        return RemoteOutput(self.storage, name, self._open_options(buffer_bytes))

    def put_bytes(self, name: str, data: bytes) -> None:
        self.storage.pipe(name, data)

    def shard_done(self, name: str, size: object, sha256: object, buffer_bytes: int) -> bool:
        # Object stores publish only complete uploads: an object of the right size is the shard.
        return self.exists(name) and self.storage.size(name) == size


class S3Destination(ObjectDestination):
    takes_parts = True

    def _open_options(self, buffer_bytes: int) -> dict[str, Any]:
        return {"block_size": max(buffer_bytes, 5 << 20)}  # S3's smallest multipart part

    def _s3(self, op: str, name: str, **kwargs: Any) -> Any:
        fs = self.storage.fs
        bucket, key, _ = fs.split_path(self.storage.path(name))
        return fs.call_s3(op, Bucket=bucket, Key=key, **kwargs)

    def begin_parts(self, name: str, size: int, plan_digest: str) -> str:
        """Start the shard's multipart upload; returns its upload id."""
        return str(self._s3("create_multipart_upload", name)["UploadId"])

    def part_output(self, name: str, handle: str, start: int, upload_part_bytes: int) -> PartOutput | MultipartPart:
        def send(number: int, body: PartBody) -> dict[str, Any]:
            r = self._s3("upload_part", name, UploadId=handle, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": r["ETag"]}

        return MultipartPart(send, start, upload_part_bytes)

    def commit_parts(self, name: str, size: int, handle: str, uploaded: list[dict[str, Any]],
                     buffer_bytes: int, drop_cache: bool = False) -> None:
        """Complete the upload: the object appears whole (each writer hashed its part)."""
        self._s3("complete_multipart_upload", name, UploadId=handle,
                 MultipartUpload={"Parts": sorted(uploaded, key=lambda p: p["PartNumber"])})
        self.storage.invalidate_cache()

    def abort_parts(self, name: str, handle: str) -> None:
        try:
            self._s3("abort_multipart_upload", name, UploadId=handle)
        except Exception as e:  # an unfinished upload never becomes an object; the error being handled matters more
            log.warning("could not abort multipart upload %s of %s (%s: %s); the object store may keep "
                        "its parts until its lifecycle rules remove them", handle, self.describe(name),
                        type(e).__name__, e)

    def parts_kept(self, name: str, handle: str, size: int) -> dict[int, str] | None:
        try:
            got = self._s3("list_parts", name, UploadId=handle, MaxParts=10000).get("Parts", [])
        except Exception:  # the upload was completed or aborted since
            return None
        return {int(p["PartNumber"]): str(p["ETag"]) for p in got}

    def leftover_parts(self) -> list[tuple[str, str]]:
        """Every open multipart upload below the destination: parts, or s3fs uploads of whole shards."""
        bucket, prefix, _ = self.storage.fs.split_path(self.storage.path("x"))
        prefix, out, marks = prefix[:-1], [], {}  # type: ignore[var-annotated]
        while True:
            page = self.storage.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marks)
            out += [(u["Key"][len(prefix):], u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            marks = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
