"""Verify a rewritten checkpoint: every byte of every output tensor equals its planned source slice.

The plan travels in the destination's ``pruning.json``, so any checkpoint this tool wrote can be
verified against its source. Tensors are compared by streaming both sides through sha256 with a
bounded buffer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from planners.plan import PROVENANCE_NAME, Plan, Segment, source_location
from rewriter.core.checkpoint import CONFIG_NAME, Checkpoint
from rewriter.core.errors import CheckpointError, PlanError, RewriterError
from rewriter.core.jsonfile import parse_json_object
from rewriter.core.storage import Storage
from rewriter.exec.copy import DEFAULT_BUFFER_BYTES


@dataclass
class VerifyReport:
    dst: str
    src: str
    tensors_checked: int = 0
    bytes_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def load_provenance_plan(dst: Storage) -> Plan:
    """The plan recorded in ``pruning.json`` of a checkpoint this tool wrote."""
    if not dst.exists(PROVENANCE_NAME):
        raise PlanError(f"{dst.describe(PROVENANCE_NAME)} not found: {dst.url} was not written by this tool")
    doc = parse_json_object(dst.read_all(PROVENANCE_NAME), dst.describe(PROVENANCE_NAME), PlanError,
                            ("this tool's record of the plan", f"{dst.url} is damaged: write it again with "
                             "`rewriter run PLAN --out DST --force`"))
    try:
        return Plan.from_json(doc["plan"], dst.describe(PROVENANCE_NAME))
    except (KeyError, TypeError) as e:
        raise PlanError(f"{dst.describe(PROVENANCE_NAME)}: unreadable provenance ({e})") from None


def _planned_digest(storage: Storage, segments: tuple[Segment, ...], buffer: bytearray) -> str:
    """sha256 of what a tensor's segments say: source ranges and literal bytes, in order."""
    h = hashlib.sha256()
    for s in segments:
        if s.data is not None:
            h.update(s.data)
        else:
            for chunk in storage.iter_range(s.shard, s.offset, s.offset + s.length, buffer):
                h.update(chunk)
    return h.hexdigest()


def verify(
    src_url: str | None,
    dst_url: str,
    *,
    src_options: Mapping[str, Any] | None = None,
    dst_options: Mapping[str, Any] | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> VerifyReport:
    """Check ``dst_url`` against its plan and source.

    Checks: the destination opens as a valid checkpoint (headers, index, ``total_size``); its
    shards and headers are the planned ones; ``config.json`` is the planned config and its
    expert count matches the router and expert tensors; the source still matches the plan's
    fingerprint; every output tensor's bytes hash to the same value as its source segments.

    Args:
        src_url: the source; ``None`` uses the source URL recorded in the plan.
    """
    with Storage(dst_url, dst_options) as dst_store:
        plan = load_provenance_plan(dst_store)
        with Storage(src_url or plan.source_url, src_options) as src_store:
            return _verify(plan, src_store, dst_store, buffer_bytes)


def _refuse_other_source(plan: Plan, src: Checkpoint, dst: Storage) -> None:
    """Stop before reading any tensor when SRC is another checkpoint than the one DST was made
    from: its bytes say nothing about DST (a changed source at the same place is a problem found)."""
    if source_location(src.storage) == plan.source_url:
        return
    now = src.fingerprint()
    differ = [name for name, fp in plan.source_shards.items() if dict(now.get(name) or {}) != dict(fp)]
    if not differ:
        return  # the same shards, copied or mounted elsewhere
    what = "has no shard" if differ[0] not in now else "has a different shard"
    raise PlanError(
        f"{src.url} is not the source of {dst.url}: that was made from {plan.source_url} (recorded in "
        f"{dst.describe(PROVENANCE_NAME)}), and {src.url} {what} '{differ[0]}' of it"
        f"{f' ({len(differ)} shards differ)' if len(differ) > 1 else ''}; pass the source the output "
        f"was made from, or give only DST to verify against the recorded one"
    )


def _verify(plan: Plan, src_store: Storage, dst_store: Storage, buffer_bytes: int) -> VerifyReport:
    report = VerifyReport(dst_store.url, src_store.url)
    try:
        dst = Checkpoint.open(dst_store.url, storage=dst_store)
    except RewriterError as e:
        report.problems.append(str(e))
        return report
    src = Checkpoint.open(src_store.url, storage=src_store)
    _refuse_other_source(plan, src, dst_store)
    try:
        plan.check_source(src)
    except PlanError as e:
        report.problems.append(str(e))
    if dst.config != dict(plan.config):
        report.problems.append(f"{dst_store.describe(CONFIG_NAME)} differs from the planned config")
    if plan.loadable:
        try:
            dst.layout.moe_layers(dst)
        except CheckpointError as e:
            report.problems.append(str(e))
    planned = {o.name: o for o in plan.outputs}
    if set(planned) != set(dst.shards):
        report.problems.append(f"shards {sorted(dst.shards)} differ from the planned {sorted(planned)}")
    buf_a, buf_b = bytearray(buffer_bytes), bytearray(buffer_bytes)
    for name, out in planned.items():
        if name not in dst.shards:
            continue
        head = dst_store.read_range(name, 0, len(out.header))
        if head != out.header:
            report.problems.append(f"{dst_store.describe(name)}: header differs from the plan")
            continue
        for t in out.tensors:
            info = dst.tensors.get(t.name)
            if info is None or info.shard != name:
                report.mismatches.append(t.name)
                continue
            got = _planned_digest(dst_store, (Segment(name, info.begin, info.nbytes),), buf_a)
            want = _planned_digest(src.storage, t.segments, buf_b)
            report.tensors_checked += 1
            report.bytes_checked += info.nbytes
            if got != want:
                report.mismatches.append(t.name)
    return report
