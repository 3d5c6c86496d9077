"""The driver's side of shards written in parts: which parts are still to write, each shard's
attempt (a file or an upload id, begun when its first part is handed out), the part journal,
and publishing a shard once its parts are in. Also checks, for every shard an actor reports,
that the driver sees it in the destination at its planned size before it is recorded.

Resume: a shard a killed run began keeps its attempt when it survives (the file at its size, or
the upload still open); journaled parts of a file are checked by the actor that gets them (it
hashes the bytes already there against the journal and writes them again only on a mismatch);
journaled upload parts are kept when the store still lists them with their ETags. Every other
attempt a previous run left is discarded (files deleted, uploads aborted) before work starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from core.errors import ExecutionError
from planners.plan import Plan
from planners.tensors import OutputShard
from rewriter.exec.dest import (
    TMP_DIR,
    Destination,
    PartJournal,
    ShardParts,
    ShardResult,
    abort_parts,
    leftover_parts,
)
from rewriter.exec.distributed.parts import Part, split_parts

log = logging.getLogger(__name__)


@dataclass
class Assembly:
    """A shard being written in parts by several actors."""

    out: OutputShard
    handle: str | None
    left: int
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    result: ShardResult | None = None


@dataclass
class Assemblies:
    plan: Plan
    dst: Destination
    journal: PartJournal
    record: Callable[[ShardResult], None]
    declared_bytes: int
    drop_cache: bool = False
    #: Told ``(parts done, parts in all)`` of the shards written in parts, as parts come in.
    on_parts: Callable[[int, int], None] | None = None
    shards: dict[str, Assembly] = field(default_factory=dict)
    parts_total: int = 0
    parts_done: int = 0

    def tasks(self, todo: list[OutputShard], part_bytes: int, in_parts: bool) -> list[OutputShard | Part]:
        """The tasks for ``todo``; discards what earlier runs left that is not reused."""
        tasks: list[OutputShard | Part] = []
        for out in todo:
            if in_parts and out.size > part_bytes and isinstance(self.dst, ShardParts):
                tasks += self._parts_of(out, split_parts(out, part_bytes))
            else:
                tasks.append(out)
        keep = {a.handle for a in self.shards.values() if a.handle}
        stale = [(n, h) for n, h in leftover_parts(self.dst) if h not in keep]
        if stale:
            log.warning("discarding %d unfinished writes a previous run left in %s (%s)", len(stale), self.dst.url,
                        ", ".join(n for n, _ in stale[:4]) + (" ..." if len(stale) > 4 else ""))
        for name, handle in stale:
            abort_parts(self.dst, name, handle)
        for name in [n for n in self.journal.shards if n not in self.shards or not self.shards[n].handle]:
            self.journal.shards.pop(name)
        self.journal.flush()
        self.parts_total = sum(len(a.done) + a.left for a in self.shards.values())
        self.parts_done = sum(len(a.done) for a in self.shards.values())
        self._tell_parts()
        for asm in [a for a in self.shards.values() if a.left == 0]:  # every part kept: nothing to hand out
            self._publish(asm, "the driver's node")
        return tasks

    def _tell_parts(self) -> None:
        if self.on_parts is not None and self.parts_total:
            self.on_parts(self.parts_done, self.parts_total)

    def _parts_of(self, out: OutputShard, parts: list[Part]) -> list[Part]:
        old = self.journal.shards.get(out.name) or {}
        kept = self._parts().parts_kept(out.name, old["handle"], out.size) if old.get("size") == out.size else None
        if kept is None:
            self.shards[out.name] = Assembly(out, None, len(parts))
            return parts
        asm = self.shards[out.name] = Assembly(out, old["handle"], len(parts))
        todo: list[Part] = []
        for p in parts:
            e = old["parts"].get(str(p.index))
            if not isinstance(e, dict) or (e.get("start"), e.get("length")) != (p.start, p.length):
                todo.append(p)
            elif not kept:  # bytes in a file: the actor checks them against the journal
                todo.append(replace(p, expect_sha256=str(e.get("sha256", ""))))
            elif e.get("uploaded") and all(kept.get(u.get("PartNumber")) == u.get("ETag") for u in e["uploaded"]):
                asm.done[p.index] = {**e, "resumed": True}
                asm.left -= 1
            else:
                todo.append(p)
        if asm.done:
            log.info("%s: %d of %d parts kept from the previous run", out.name, len(asm.done), len(parts))
        return todo

    def _parts(self) -> ShardParts:
        # Only shards of a destination that takes parts are ever split into parts (tasks()).
        if not isinstance(self.dst, ShardParts):
            raise ExecutionError(f"{self.dst.url} takes no shards in parts")
        return self.dst

    def handle(self, name: str) -> str:
        """The shard's attempt, begun (and journaled) when its first part is handed out."""
        asm = self.shards[name]
        if asm.handle is None:
            asm.handle = self._parts().begin_parts(name, asm.out.size, self.plan.digest)
            self.journal.begin(name, asm.handle, asm.out.size)
        return asm.handle

    def collect(self, res: dict[str, Any], where: str) -> None:
        if "shard" in res:
            r = ShardResult(**res["shard"])
            self._check_visible(r.name, r.size, where)
            self._check_memory(r.peak_rss_bytes, where)
            self.record(r)
            return
        entry = res["part"]
        self._check_memory(res.get("rss", 0), where)
        asm, index = self.shards[entry["shard"]], int(entry["index"])
        asm.done[index] = entry
        self.journal.record(asm.out.name, index, {k: entry[k] for k in ("start", "length", "sha256", "uploaded")})
        asm.left -= 1
        self.parts_done += 1
        self._tell_parts()
        if asm.result is None:
            asm.result = ShardResult(asm.out.name, asm.out.size, "")
        asm.result.bytes_read += entry["stats"]["bytes_read"]
        asm.result.zero_copy_bytes += entry["stats"]["zero_copy_bytes"]
        asm.result.peak_rss_bytes = max(asm.result.peak_rss_bytes, res.get("rss", 0))
        if asm.left == 0:
            self._publish(asm, where)

    def _publish(self, asm: Assembly, where: str) -> None:
        assert asm.handle is not None
        parts = [asm.done[i] for i in sorted(asm.done)]
        uploaded = [u for p in parts for u in p.get("uploaded", [])]
        self._parts().commit_parts(asm.out.name, asm.out.size, asm.handle, uploaded, 1 << 20, self.drop_cache)
        self._check_visible(asm.out.name, asm.out.size, where)
        r = asm.result or ShardResult(asm.out.name, asm.out.size, "")
        r.parts = [{k: p[k] for k in ("start", "length", "sha256")} | {"resumed": bool(p.get("resumed"))}
                   for p in parts]
        self.record(r)
        self.journal.finish(asm.out.name)
        del self.shards[asm.out.name]

    def _check_visible(self, name: str, size: int, where: str) -> None:
        """A shard is recorded only when the driver sees it, whole, where the actor wrote it."""
        self.dst.storage.invalidate_cache()
        got = self.dst.storage.size(name) if self.dst.exists(name) else None
        if got != size:
            seen = "is not there" if got is None else f"holds {got:,} bytes, not {size:,}"
            raise ExecutionError(
                f"{self.dst.describe(name)}, written by the Ray actor on {where}, {seen} for the driver: the "
                f"nodes do not share the destination {self.dst.url}; use an object store or a filesystem "
                f"mounted at the same path on every node")

    def _check_memory(self, rss: int, where: str) -> None:
        if rss > self.declared_bytes:
            log.warning("the Ray actor on %s used %d MiB, more than the %d MiB it declared", where, rss >> 20,
                        self.declared_bytes >> 20)

    def discard_attempt(self, task: OutputShard | Part, pid: str | None) -> None:
        """Before a whole shard is written again: remove what the dead attempt (process ``pid``)
        left, its temporary file or its open upload. (A part's retry rewrites the same range of
        the same attempt.)"""
        if isinstance(task, Part):
            return
        base = f"{TMP_DIR}/{task.name.rsplit('/', 1)[-1]}.{pid}."
        for f in self.dst.list_files() if pid else []:
            if f.startswith(base) and f.endswith(".part"):
                self.dst.remove(f)
        keep = {a.handle for a in self.shards.values()}
        for name, handle in leftover_parts(self.dst):
            if name == task.name and handle not in keep:
                abort_parts(self.dst, name, handle)
