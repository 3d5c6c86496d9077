"""``rewriter cleanup DST``: what a killed run left in a destination, listed and removed.

A run killed with SIGKILL (or on a lost machine) leaves unfinished work behind: multipart
uploads an object store keeps (and bills) until they are aborted, large-shard part files in
``DST/.rewriter/parts/``, temporaries in ``DST/.rewriter/tmp/`` and probe files. The next run of
the same plan reuses what it can and discards the rest itself; ``cleanup`` is for a destination
that will not be run again, or to free the space now. It takes the destination's lock first, so
a run still writing is never disturbed. The journal stays: finished shards are kept and a later
run resumes from them (the parts of unfinished shards are written again).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rewriter.exec.destination import TMP_DIR, Destination, open_destination
from rewriter.exec.journal import PARTS_JOURNAL
from rewriter.exec.lock import STATE_DIR, DestinationLock

PROBE_PREFIX = f"{STATE_DIR}/probe/"


def leftovers(dst: Destination) -> tuple[list[tuple[str, str]], list[str]]:
    """Unfinished shard attempts ``(name, upload id or part file)``, and leftover state files."""
    files = [f for f in dst.list_files() if f.startswith((TMP_DIR + "/", PROBE_PREFIX)) or f == PARTS_JOURNAL]
    return dst.leftover_parts(), files


def cleanup(dst_url: str, dst_options: Mapping[str, Any] | None = None, *, dry_run: bool = False) -> list[str]:
    """Abort and remove what killed runs left in ``dst_url`` (only list it with ``dry_run``).

    Returns:
        One line per thing found, saying what was (or would be) done with it.

    Raises:
        DestinationLockedError: a run is using the destination.
    """
    dst = open_destination(dst_url, dst_options)
    if not dst.exists(STATE_DIR):
        return []
    lines: list[str] = []
    would = "would " if dry_run else ""
    with DestinationLock(dst.storage):
        attempts, files = leftovers(dst)
        for name, handle in attempts:
            if dst.storage.is_local:
                lines.append(f"{would}remove{'' if dry_run else 'd'} part file {handle} (of {name})")
            else:
                lines.append(f"{would}abort{'' if dry_run else 'ed'} multipart upload {handle} of {dst.describe(name)}")
            if not dry_run:
                dst.abort_parts(name, handle)
        for f in files:
            lines.append(f"{would}remove{'' if dry_run else 'd'} {dst.describe(f)}")
            if not dry_run:
                dst.remove(f)
    if not dry_run:
        dst.drop_empty_state(created=False)
    return lines
