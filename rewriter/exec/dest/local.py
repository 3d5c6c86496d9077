"""A destination on a local (or shared) filesystem: temporary names under ``DST/.rewriter/tmp``,
fsync, rename.

Large shards in parts: one preallocated file per attempt in ``DST/.rewriter/parts/`` (not the
temporary folder every run clears, so a run killed midway resumes part by part), filled by
positioned writes of several workers and renamed into place once every part is in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from typing import Any

from core.errors import ExecutionError
from core.storage import Storage
from rewriter.exec.dest.base import TMP_DIR, Destination, ShardParts
from rewriter.exec.dest.lock import LOCK_NAME, STATE_DIR
from rewriter.exec.io import LocalOutput, MultipartPart, Output, PartOutput
from rewriter.exec.io.fileio import OUTPUT_MODE, fsync_dir, sha256_fd, write_errors_are_clear
from rewriter.exec.options import DEFAULT_BUFFER_BYTES

#: Files of large shards being written in parts (kept across runs, to resume part by part).
PARTS_DIR = f"{STATE_DIR}/parts"


class LocalDestination(Destination, ShardParts):
    zero_copy = True

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

    # --- a shard in parts ------------------------------------------------------------------

    def parts_done(self, name: str, size: object, parts: list[Any], buffer_bytes: int) -> bool:
        """Whether ``name`` is the shard journaled as ``parts``: its size and every part's sha256
        (a file can be damaged after its rename)."""
        path = self._path(name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
        return all(range_sha256(self.storage, name, p, buffer_bytes) == p.get("sha256") for p in parts)

    def begin_parts(self, name: str, size: int, plan_digest: str) -> str:
        """Create this attempt's file at full size (part 0 writes the header), named uniquely."""
        path = self._path(f"{PARTS_DIR}/{name}.{plan_digest[:12]}.{uuid.uuid4().hex[:12]}.parts")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with write_errors_are_clear(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OUTPUT_MODE)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        return path

    def part_output(self, name: str, handle: str, start: int, upload_part_bytes: int) -> PartOutput | MultipartPart:
        return PartOutput(handle, start)

    def commit_parts(self, name: str, size: int, handle: str, uploaded: list[dict[str, Any]],
                     buffer_bytes: int, drop_cache: bool = False) -> None:
        """fsync and publish a shard whose parts are all written (each writer hashed its part)."""
        fd = os.open(handle, os.O_RDONLY)
        try:
            with write_errors_are_clear(handle):
                os.fsync(fd)
            if os.fstat(fd).st_size != size:
                raise ExecutionError(f"{name}: assembled {os.fstat(fd).st_size:,} bytes, planned {size:,}")
            if drop_cache:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        final = self._path(name)
        os.replace(handle, final)
        fsync_dir(os.path.dirname(final))

    def abort_parts(self, name: str, handle: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(handle)

    def parts_kept(self, name: str, handle: str, size: int) -> dict[int, str] | None:
        ok = handle.startswith(self._path(PARTS_DIR)) and os.path.isfile(handle) and os.path.getsize(handle) == size
        return {} if ok else None

    def part_sha256(self, handle: str, start: int, length: int, buffer_bytes: int) -> str | None:
        h = hashlib.sha256()
        with open(handle, "rb", buffering=0) as f:
            f.seek(start)
            while length > 0:
                chunk = f.read(min(length, buffer_bytes))
                if not chunk:
                    return None
                h.update(chunk)
                length -= len(chunk)
        return h.hexdigest()

    def leftover_parts(self) -> list[tuple[str, str]]:
        folder = self._path(PARTS_DIR)
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        return [(f.rsplit(".", 3)[0], os.path.join(folder, f)) for f in names if f.endswith(".parts")]


def range_sha256(storage: Storage, name: str, part: Any, buffer_bytes: int) -> str | None:
    """sha256 of the range ``part`` (``{"start", "length"}``) of file ``name``; None if malformed."""
    try:
        start, length = int(part["start"]), int(part["length"])
    except (KeyError, TypeError, ValueError):
        return None
    h = hashlib.sha256()
    for chunk in storage.iter_range(name, start, start + length, bytearray(min(buffer_bytes, max(length, 1)))):
        h.update(chunk)
    return h.hexdigest()
