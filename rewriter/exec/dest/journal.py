"""The destination's run state: which plan it belongs to and which shards are done.

``DST/.rewriter/journal.json`` names the plan and records each finished shard's size and sha256.
A destination holding another plan's journal or output is refused (unless ``force``); a run of
the same plan resumes from the shards its journal vouches for.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from core import jsonfile
from core.checkpoint import INDEX_NAME
from core.errors import DestinationFullError, ExecutionError
from core.gguf_model import INDEX_NAME as GGUF_INDEX_NAME
from core.storage import Storage
from planners.plan import PROVENANCE_NAME, Plan
from planners.tensors import OutputShard
from rewriter.exec.dest.base import Destination, ShardParts
from rewriter.exec.dest.lock import STATE_DIR, DestinationLock

log = logging.getLogger(__name__)

JOURNAL = f"{STATE_DIR}/journal.json"


@dataclass
class ShardResult:
    """What writing one output shard did; small enough to pass between processes."""

    name: str
    size: int
    sha256: str
    bytes_read: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    copy_seconds: float = 0.0
    zero_copy_bytes: int = 0
    resumed: bool = False
    #: A shard written in parts: ``[{"start", "length", "sha256"}, ...]`` (``sha256`` is then empty).
    parts: list[dict[str, Any]] | None = None
    #: Peak RSS of the process that wrote it (Ray actors report theirs).
    peak_rss_bytes: int = 0

    def record(self) -> dict[str, Any]:
        """What the journal and ``pruning.json`` keep: size, and sha256 or the parts' hashes."""
        if self.parts:
            return {"size": self.size, "parts": [{k: p[k] for k in ("start", "length", "sha256")} for p in self.parts]}
        return {"size": self.size, "sha256": self.sha256}


class Journal:
    """Finished shards of one plan in one destination; written by the driving process only."""

    def __init__(self, dst: Destination, plan_digest: str, lock: DestinationLock | None = None):
        self.dst = dst
        self.plan_digest = plan_digest
        self.shards: dict[str, dict[str, Any]] = {}
        self.lock = lock

    @classmethod
    def read(cls, dst: Destination) -> dict[str, Any] | None:
        if not dst.exists(JOURNAL):
            return None
        try:
            return jsonfile.loads(dst.read_all(JOURNAL))
        except ValueError:  # not JSON, or not even UTF-8
            return None  # torn by a crash before its rename: treat as absent

    def record(self, result: ShardResult) -> None:
        """Vouch for a published shard. A shard that cannot be recorded (a full disk) is removed:
        a resume would write it again anyway, and the destination then holds just the shards the
        journal vouches for, which the error counts as kept."""
        self.shards[result.name] = result.record()
        try:
            self.flush()
        except DestinationFullError:
            del self.shards[result.name]
            try:
                self.dst.remove(result.name)
            except Exception as e:  # the full disk is the error to report; a resume rewrites the shard
                log.warning("could not remove %s, which the journal does not vouch for: %s",
                            self.dst.describe(result.name), e)
            raise
        if self.lock:
            self.lock.refresh()

    def flush(self) -> None:
        doc = {"plan": self.plan_digest, "shards": self.shards}
        self.dst.put_bytes(JOURNAL, json.dumps(doc, indent=1, sort_keys=True).encode())


def check_destination(src: Storage, dst: Destination, source_files: Iterable[str] = ()) -> None:
    """Refuse a destination that overlaps the source or is not a folder, before writing anything.

    "The source" is decided by identity: a bind mount of the source folder, a path through a
    symlinked parent or with ``..`` is the source too, and so is a destination file that is a
    hard link of one of ``source_files`` (``--force`` would remove it, a run would replace it).

    Raises:
        ExecutionError: destination equal to, inside, or containing the source; a destination
            holding a source file under another name; a destination that is a file, or lies
            below one.
    """
    inside, contains = dst.storage.is_within(src), src.is_within(dst.storage)
    # A GGUF model is its files, not their folder: a folder below them is fine.
    below_gguf = src.entry is not None and inside and not contains
    if (inside and not below_gguf) or contains:
        how = "is the source" if inside and contains else "lies inside the source" if inside else "contains the source"
        raise ExecutionError(
            f"destination {dst.url} {how} {src.url} (compared as folders on disk, so a bind mount, a "
            f"symlink or '..' reach the same one); the source is never modified or removed: choose a "
            f"destination outside the source folder"
        )
    dst.check_folder()
    if dst.storage.exists():
        _refuse_source_files(src, dst, source_files)


def _refuse_source_files(src: Storage, dst: Destination, source_files: Iterable[str]) -> None:
    """Refuse a destination file that is one of the source's files (a hard link, or a mount of the
    source folder somewhere below the destination)."""
    ours = src.identities(source_files)
    if not ours:
        return
    for ident, name in dst.storage.identities(dst.list_files()).items():
        found = ours.get(ident)
        if found is not None:
            raise ExecutionError(
                f"{dst.describe(name)} is the source's file {src.describe(found)} (the same file on disk: a hard "
                f"link, or the source mounted inside the destination); the source is never modified or removed: "
                f"choose another destination, or remove that link first"
            )


def prepare_destination(plan: Plan, dst: Destination, *, force: bool = False,
                        lock: DestinationLock | None = None) -> tuple[Journal, bool]:
    """Check the destination against the plan and load the journal of an interrupted run.
    Call with the destination's lock held.

    Returns:
        The journal, and whether the destination already holds this plan's complete output.

    Raises:
        ExecutionError: a destination holding another plan's output or unrelated files (unless
            ``force``).
    """
    digest = plan.digest
    journal = Journal(dst, digest, lock)
    files = dst.list_files()
    state = Journal.read(dst) if files else None
    if state is None and all(f.startswith(STATE_DIR + "/") for f in files):
        return journal, False  # empty, or only the state of a run killed before its journal
    prov_digest = _provenance_digest(dst)
    ours = (state and state.get("plan") == digest) or prov_digest == digest
    if ours:
        if prov_digest == digest and dst.exists(plan.index_name) and not dst.exists(JOURNAL):
            return journal, True
        if state and state.get("plan") == digest:
            journal.shards = dict(state.get("shards", {}))
        return journal, False
    if not force:
        what = "output of another plan" if (state or prov_digest) else "files this tool did not write"
        raise ExecutionError(
            f"destination {dst.url} is not empty: it holds {what}; choose an empty destination, "
            f"or pass --force to overwrite it"
        )
    _clear_output(dst, files, "the output of another plan" if (state or prov_digest) else "files this tool did not write")
    return journal, False


def _provenance_digest(dst: Destination) -> str | None:
    if not dst.exists(PROVENANCE_NAME):
        return None
    try:
        return jsonfile.loads(dst.read_all(PROVENANCE_NAME)).get("plan_digest")
    except (ValueError, AttributeError):  # not JSON (or not UTF-8), or not an object
        return None


def _clear_output(dst: Destination, files: list[str], held: str) -> None:
    """``--force``: remove what marks a destination complete or could pass for shards of the new
    output (index, provenance, journal, top-level ``*.safetensors`` and ``*.gguf``), saying what goes
    and what stays."""
    removed = [f for f in files if f in (INDEX_NAME, GGUF_INDEX_NAME, PROVENANCE_NAME, JOURNAL)
               or (f.endswith((".safetensors", ".gguf")) and "/" not in f)]
    stays = [f for f in files if f not in removed and not f.startswith(STATE_DIR + "/")]
    log.warning("--force: %s holds %s; removing %d of its files so that none is taken for part of the new "
                "output: %s%s", dst.url, held, len(removed), _some(removed),
                f"; left in place: {_some(stays)} (those the new output also writes are replaced; the others "
                f"stay in the folder and would be uploaded with it)" if stays else "")
    for name in removed:
        dst.remove(name)


def _some(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


#: Shards a resumed run checks at once (each reads its file back through one buffer; hashing and
#: reads release the GIL, so the checks of a large resume run on several cores and disks queues).
RESUME_CHECKS = min(4, os.cpu_count() or 1)


def pending_shards(plan: Plan, journal: Journal, buffer_bytes: int) -> tuple[list[OutputShard], list[ShardResult]]:
    """Split the plan's shards into those still to write and those the journal vouches for."""
    entries = {o.name: journal.shards.get(o.name) for o in plan.outputs}
    vouched = [(name, e) for name, e in entries.items() if e]
    with ThreadPoolExecutor(max_workers=max(1, min(RESUME_CHECKS, len(vouched)))) as pool:
        there = dict(zip([n for n, _ in vouched],
                         pool.map(lambda ne: _still_there(journal.dst, ne[0], ne[1], buffer_bytes), vouched)))
    todo, done = [], []
    for out in plan.outputs:
        entry = entries[out.name]
        if entry and there[out.name]:
            parts = entry.get("parts")
            done.append(ShardResult(out.name, out.size, "" if parts else entry["sha256"], resumed=True, parts=parts))
        else:
            journal.shards.pop(out.name, None)
            todo.append(out)
    return todo, done


def _still_there(dst: Destination, name: str, entry: dict[str, Any], buffer_bytes: int) -> bool:
    parts = entry.get("parts")
    if isinstance(parts, list) and isinstance(dst, ShardParts):
        return dst.parts_done(name, entry.get("size"), parts, buffer_bytes)
    return dst.shard_done(name, entry.get("size"), entry.get("sha256"), buffer_bytes)


PARTS_JOURNAL = f"{STATE_DIR}/parts.json"


class PartJournal:
    """Large shards being written in parts: each one's attempt (its file, or upload id) and the
    parts finished so far with their sha256 (and upload parts). Written by the driver only, so
    a killed run's successor resumes part by part and aborts what it does not reuse."""

    def __init__(self, dst: Destination, plan_digest: str):
        self.dst = dst
        self.plan_digest = plan_digest
        self.shards: dict[str, dict[str, Any]] = {}

    @classmethod
    def load(cls, dst: Destination, plan_digest: str) -> PartJournal:
        """This plan's part journal in ``dst`` (empty when absent, torn or another plan's)."""
        journal = cls(dst, plan_digest)
        try:
            doc = jsonfile.loads(dst.read_all(PARTS_JOURNAL)) if dst.exists(PARTS_JOURNAL) else {}
        except ValueError:
            doc = {}
        if isinstance(doc, dict) and doc.get("plan") == plan_digest and isinstance(doc.get("shards"), dict):
            journal.shards = {k: v for k, v in doc["shards"].items()
                              if isinstance(v, dict) and isinstance(v.get("parts"), dict) and isinstance(v.get("handle"), str)}
        return journal

    def begin(self, name: str, handle: str, size: int) -> None:
        self.shards[name] = {"handle": handle, "size": size, "parts": {}}
        self.flush()

    def record(self, name: str, index: int, entry: dict[str, Any]) -> None:
        self.shards[name]["parts"][str(index)] = entry
        self.flush()

    def finish(self, name: str) -> None:
        self.shards.pop(name, None)
        self.flush()

    def flush(self) -> None:
        doc = {"plan": self.plan_digest, "shards": self.shards}
        self.dst.put_bytes(PARTS_JOURNAL, json.dumps(doc, indent=1, sort_keys=True).encode())
