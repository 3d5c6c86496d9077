"""What a run checks before it writes its first byte."""

from __future__ import annotations

import os

from core.checkpoint import INDEX_NAME, Checkpoint
from core.errors import CheckpointError
from core.storage import Storage
from planners.carried import require_carried_bytes
from planners.plan import Plan
from planners.source_check import check_source
from rewriter.exec.dest import Destination, check_destination


def check_inputs(plan: Plan, src: Storage, dst: Destination) -> None:
    """Every input of a run checked before the first byte is written: the source is the one
    planned, its files to copy are there, and the destination is not the source."""
    require_carried_bytes(plan)
    ckpt = Checkpoint.open(plan.source_url, storage=src)
    check_small_files(plan, ckpt)
    check_source(plan, ckpt)
    check_destination(src, dst, [*ckpt.shards, INDEX_NAME, *ckpt.files])


def check_small_files(plan: Plan, ckpt: Checkpoint) -> None:
    """Refuse a plan whose files to copy are not all regular files of the source, before the
    first byte is written (not after every shard)."""
    src = ckpt.storage
    for name in plan.copy_files:
        if name not in ckpt.files:
            raise CheckpointError(f"{src.describe(name)}: the plan copies this file (copy_files), but the source "
                                  f"has no such file; restore it, or plan again from the source as it is")
        if src.is_local and not os.path.isfile(src.local_path(name)):
            raise CheckpointError(f"{src.describe(name)}: the plan copies this as a file (copy_files), but it is "
                                  f"not a regular file (a folder, or a device or pipe); plan again")
