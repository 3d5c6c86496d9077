"""Destinations and the state of a run kept in them: writing outputs and small files into a local
folder or an object store (the interface: :mod:`.base`; implementations: :mod:`.local`,
:mod:`.objects`), the lock, the journal of finished shards, the status document.

``cleanup`` (what killed runs left) is :func:`rewriter.exec.dest.cleanup.cleanup`.
"""

from rewriter.exec.dest.base import TMP_DIR, Destination, ShardParts, abort_parts, leftover_parts
from rewriter.exec.dest.destination import open_destination
from rewriter.exec.dest.journal import (
    JOURNAL,
    PartJournal,
    ShardResult,
    check_destination,
    pending_shards,
    prepare_destination,
)
from rewriter.exec.dest.lock import STATE_DIR, DestinationLock
from rewriter.exec.dest.runstatus import RunObserver, StatusWriter, format_status, read_status

__all__ = [
    "JOURNAL", "STATE_DIR", "TMP_DIR", "Destination", "DestinationLock", "PartJournal", "RunObserver",
    "ShardParts", "ShardResult", "StatusWriter", "abort_parts", "check_destination", "format_status",
    "leftover_parts", "open_destination", "pending_shards", "prepare_destination", "read_status",
]
