"""``rewriter cleanup DST``: what a killed run left in a destination, listed and removed.

A run killed with SIGKILL (or on a lost machine) leaves unfinished work behind: multipart
uploads an object store keeps (and bills) until they are aborted, large-shard part files in
``DST/.rewriter/parts/``, temporaries in ``DST/.rewriter/tmp/`` and probe files. The next run of
the same plan reuses what it can and discards the rest itself; ``cleanup`` is for a destination
that will not be run again, or to free the space now. It takes the destination's lock first, so
a run still writing is never disturbed; ``--dry-run`` only reads, without the lock, and says when
a run is in progress (what it lists is then partly that run's work). A destination that is not
a folder is refused; one with no run state (no ``DST/.rewriter/``) is left exactly as it was. The journal stays: finished shards are kept and a later
run resumes from them (the parts of unfinished shards are written again); the status document
then counts only those (``rewriter status``).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Mapping
from typing import Any

from core.errors import ExecutionError
from rewriter.exec.dest.base import TMP_DIR, Destination, abort_parts, leftover_parts
from rewriter.exec.dest.destination import open_destination
from rewriter.exec.dest.journal import PARTS_JOURNAL
from rewriter.exec.dest.lock import LOCK_NAME, STATE_DIR, DestinationLock, LockOwner
from rewriter.exec.dest.runstatus import record_cleanup

PROBE_PREFIX = f"{STATE_DIR}/probe/"


class Cleanup(list[str]):
    """One line per thing found (what was, or would be, done with it), and a ``summary`` line."""

    summary = ""


def leftovers(dst: Destination) -> tuple[list[tuple[str, str]], list[str]]:
    """Unfinished shard attempts ``(name, upload id or part file)``, and leftover state files."""
    files = [f for f in dst.list_files() if f.startswith((TMP_DIR + "/", PROBE_PREFIX)) or f == PARTS_JOURNAL]
    return leftover_parts(dst), files


def _refuse_non_folder(dst_url: str, dst: Destination) -> None:
    if not dst_url.strip():
        raise ExecutionError("the destination is empty: give the folder (or URL) a run wrote into")
    if not dst.storage.exists():
        raise ExecutionError(f"{dst.url} does not exist: give the folder (or URL) a run wrote into")
    if not dst.storage.isdir():
        raise ExecutionError(f"{dst.url} is not a folder: give the folder (or URL) a run wrote into, "
                             f"not a file in it")


def lock_holder(dst: Destination) -> str | None:
    """Who holds the destination's lock now (None: nobody), found without taking it or writing."""
    if not dst.exists(LOCK_NAME):
        return None
    owner = LockOwner.parse(dst.storage.read_all(LOCK_NAME))
    who = owner.describe() if owner else "a run that has not recorded its owner yet"
    if not dst.storage.is_local:
        return who if owner is None or not owner.is_stale(time.time()) else None
    import fcntl

    try:
        fd = os.open(dst.storage.local_path(LOCK_NAME), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return who
        raise
    finally:
        os.close(fd)  # closing also lets go of the shared lock, if it was taken
    return None


def cleanup(dst_url: str, dst_options: Mapping[str, Any] | None = None, *, dry_run: bool = False) -> Cleanup:
    """Abort and remove what killed runs left in ``dst_url`` (only list it with ``dry_run``).

    Raises:
        ExecutionError: ``dst_url`` is missing or not a folder.
        DestinationLockedError: a run is using the destination (not with ``dry_run``).
    """
    dst = open_destination(dst_url, dst_options)
    try:
        return _cleanup(dst_url, dst, dry_run)
    finally:
        dst.storage.invalidate_cache()  # no listing of DST stays cached: a later reader sees what is new


def _cleanup(dst_url: str, dst: Destination, dry_run: bool) -> Cleanup:
    _refuse_non_folder(dst_url, dst)
    out = Cleanup()
    if not dst.exists(STATE_DIR):
        out.summary = (f"{dst.url}: nothing of a run to clean (no {STATE_DIR}/ state folder: no run has "
                       f"written here, or its run finished); nothing changed")
        return out
    if dry_run:
        _list(dst, out, "would ")
        holder = lock_holder(dst)
        busy = f"; a run is in progress ({holder}): some of these are its work in hand" if holder else ""
        out.summary = f"{dst.url}: {len(out)} leftovers of killed runs found{busy}"
        return out
    with DestinationLock(dst.storage):
        _list(dst, out, "", remove=True)
        if out:
            record_cleanup(dst)
    dst.drop_empty_state(created=False)
    out.summary = f"{dst.url}: {len(out)} leftovers of killed runs cleaned up"
    return out


def _list(dst: Destination, out: Cleanup, would: str, remove: bool = False) -> None:
    attempts, files = leftovers(dst)
    done = "" if would else "d"
    for name, handle in attempts:
        if dst.storage.is_local:
            out.append(f"{would}remove{done} part file {handle} (of {name})")
        else:
            out.append(f"{would}abort{'' if would else 'ed'} multipart upload {handle} of {dst.describe(name)}")
        if remove:
            abort_parts(dst, name, handle)
    for f in files:
        out.append(f"{would}remove{done} {dst.describe(f)}")
        if remove:
            dst.remove(f)
