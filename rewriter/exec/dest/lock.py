"""One run per destination: an exclusive lock in the destination's state folder.

* **Local destinations**: ``DST/.rewriter/lock`` held with ``flock(2)`` for the whole run. The
  kernel releases it when the holder exits, however it exits (SIGKILL included), so a lock never
  outlives its run. The file also records the holder (host, pid, start time) for the message
  the next run prints.
* **Object stores** (no ``flock``): ``DST/.rewriter/lock`` is an object naming its owner (host,
  pid, start time, last refresh, a random token). It is *advisory*: an object store has no
  atomic create-if-absent here, so two runs starting within the same moment can both take it
  (each re-reads the lock after writing it, which narrows that window). The owner refreshes it
  after every shard. A lock is stale, and the next run takes it over with a warning, when its
  owner ran on this host and that process is gone, or when it has not been refreshed for
  :data:`STALE_AFTER_S` seconds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from core import jsonfile
from core.errors import CheckpointError, DestinationLockedError
from core.storage import Storage
from rewriter.exec.io.fileio import OUTPUT_MODE, write_errors_are_clear

log = logging.getLogger(__name__)

STATE_DIR = ".rewriter"
LOCK_NAME = f"{STATE_DIR}/lock"
#: An object-store lock not refreshed for this long is taken over (a shard is written between
#: refreshes, so this must exceed the time one shard takes on the slowest link in use).
STALE_AFTER_S = 3600.0


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    started: float
    refreshed: float
    token: str

    @classmethod
    def me(cls) -> LockOwner:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)

    @classmethod
    def parse(cls, raw: bytes) -> LockOwner | None:
        try:
            d = jsonfile.loads(raw)
            return cls(str(d["host"]), int(d["pid"]), float(d["started"]), float(d["refreshed"]), str(d["token"]))
        except (ValueError, KeyError, TypeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"process {self.pid} on host {self.host}, running since {since}"

    def is_stale(self, now: float) -> bool:
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return True
        return now - self.refreshed > STALE_AFTER_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked(dst: Storage, owner: LockOwner | None) -> DestinationLockedError:
    who = owner.describe() if owner else "another run (it has not recorded its owner yet)"
    return DestinationLockedError(
        f"destination {dst.url} is in use: {who} holds {dst.describe(LOCK_NAME)}; wait for that "
        f"run to finish (or stop it), then run the same command again"
    )


class DestinationLock:
    """Held for a whole run; use as a context manager, or :meth:`acquire` and :meth:`release`."""

    def __init__(self, dst: Storage):
        self.dst = dst
        self.owner = LockOwner.me()
        self._fd: int | None = None
        self._held = False

    def __enter__(self) -> DestinationLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`DestinationLockedError` naming its holder."""
        if self.dst.is_local:
            self._acquire_local()
        else:
            self._acquire_object()
        self._held = True

    def _acquire_local(self) -> None:
        import fcntl

        path = self.dst.local_path(LOCK_NAME)
        while True:
            with write_errors_are_clear(self.dst.url):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, OUTPUT_MODE)
                except FileNotFoundError:
                    continue  # a finishing run removed the state folder in between
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                owner = LockOwner.parse(os.pread(fd, 4096, 0))
                os.close(fd)
                raise _locked(self.dst, owner) from None
            # The previous holder removes the lock file (with the state folder) while holding
            # it; a lock taken on a file no longer at ``path`` locks nothing: open it again.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, self.owner.to_bytes(), 0)
        except OSError as e:
            # The lock is held all the same: the owner only names this run to another one. A full
            # disk is reported by the run's first write, which says which shards are kept.
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                os.close(fd)
                raise
        self._fd = fd

    def _acquire_object(self) -> None:
        if self.dst.exists(LOCK_NAME):
            held = LockOwner.parse(self.dst.read_all(LOCK_NAME))
            if held is not None and not held.is_stale(time.time()):
                raise _locked(self.dst, held)
            log.warning("taking over the stale lock %s (%s)", self.dst.describe(LOCK_NAME),
                        held.describe() if held else "unreadable")
        self._write_object()
        self.dst.invalidate_cache()
        now = LockOwner.parse(self.dst.read_all(LOCK_NAME))
        if now is None or now.token != self.owner.token:
            raise _locked(self.dst, now)

    def _write_object(self) -> None:
        self.dst.pipe(LOCK_NAME, self.owner.to_bytes())

    def refresh(self) -> None:
        """Show an object-store lock's owner is alive (local locks need nothing)."""
        if self._held and not self.dst.is_local:
            self.owner = LockOwner(self.owner.host, self.owner.pid, self.owner.started, time.time(), self.owner.token)
            self._write_object()

    def release(self) -> None:
        """Let go; the state folder (journal, lock file) stays unless the run removed it."""
        if not self._held:
            return
        self._held = False
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            return
        with contextlib.suppress(CheckpointError):  # already gone: nothing to release
            held = LockOwner.parse(self.dst.read_all(LOCK_NAME))
            if held is not None and held.token == self.owner.token:
                self.dst.remove(LOCK_NAME)
