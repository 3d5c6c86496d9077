"""Verify a rewritten checkpoint: every byte of every output tensor equals its planned source slice.

The plan travels in the destination's ``pruning.json``, so any checkpoint this tool wrote can be
verified against its source. Each shard is read once, in order, with a bounded buffer: its
header against the plan, its bytes against every sha256 ``pruning.json`` records for it (the whole
shard's, each part's where it was written in parts; the record itself is checked first, by
:mod:`rewriter.exec.publish.provenance_record`), and every tensor against its planned
source slice. :mod:`rewriter.exec.distributed.ray_verify` runs the same check per shard on Ray actors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from core import jsonfile
from core.checkpoint import CONFIG_NAME, Checkpoint
from core.errors import CheckpointError, PlanError, RewriterError
from core.jsonfile import parse_json_object
from core.storage import Storage
from planners.plan import PROVENANCE_NAME, Plan, require_source
from planners.provenance import LOCAL_SOURCE, published_source, source_location
from planners.source_check import check_source, copied_file_problems, copied_names
from planners.tensors import OutputShard, Segment
from rewriter.exec.options import DEFAULT_BUFFER_BYTES
from rewriter.exec.publish.provenance_record import Range, check_document


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

    def add(self, check: ShardCheck) -> None:
        self.tensors_checked += check.tensors
        self.bytes_checked += check.bytes
        self.mismatches += check.mismatches
        self.problems += check.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class ShardCheck:
    """What checking one shard found; small enough to pass between processes."""

    tensors: int = 0
    bytes: int = 0
    mismatches: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


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
    """sha256 of what a tensor's segments say: source ranges and literal bytes, in order; a
    carried tensor's is the one the plan records (``pruning.json`` holds no carried bytes)."""
    if len(segments) == 1 and segments[0].sha256 is not None:
        return segments[0].sha256
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
    progress: Progress | None = None,
) -> VerifyReport:
    """Check ``dst_url`` against its plan and source.

    Checks: the destination opens as a valid checkpoint (headers, index, ``total_size``); its
    shards and headers are the planned ones; ``config.json`` is the planned config and its
    expert count matches the router and expert tensors; the source still matches the plan's
    fingerprint; every output tensor's bytes hash to the same value as its source segments.

    Args:
        src_url: the source; ``None`` uses the source URL recorded in the plan.
        progress: called with ``(bytes, total)`` as bytes are checked: each output shard is read
            once and its tensors' source slices once, so ``total`` is :func:`bytes_to_check`.
    """
    with Storage(dst_url, dst_options) as dst_store:
        plan = load_provenance_plan(dst_store)
        with open_source(plan, src_url, src_options, dst_store) as src_store:
            return _verify(plan, src_store, dst_store, buffer_bytes, progress)


#: Progress callback of :func:`verify`: ``(bytes just checked, bytes to check in all)``.
Progress = Callable[[int, int], None]


def bytes_to_check(plan: Plan) -> int:
    """Bytes :func:`verify` reads: every output shard, and its tensors' source slices."""
    return sum(out.size + out.data_bytes for out in plan.outputs)


def open_source(plan: Plan, src_url: str | None, src_options: Mapping[str, Any] | None,
                dst: Storage) -> Storage:
    """The source to verify against: ``src_url``, or the one ``pruning.json`` records (a remote
    URL; a local source is recorded by content only, so it must be given, and one no longer
    where it was is named with the advice to pass SRC)."""
    if src_url is not None:
        return Storage(src_url, src_options)
    src = Storage(require_source(plan, "pass the source it was made from (`rewriter verify SRC DST`, or "
                                       "`rewriter card DST --verify --src SRC`)"), src_options)
    try:
        refuse_missing_recorded_source(plan, src, dst)
    except BaseException:
        src.close()
        raise
    return src


def refuse_missing_recorded_source(plan: Plan, src: Storage, dst: Storage) -> None:
    """PlanError when the source DST records is no longer where it was, saying SRC may be given."""
    if src.exists():
        return
    raise PlanError(
        f"{plan.source_url}, the source {dst.describe(PROVENANCE_NAME)} records, is not there (moved or "
        f"removed); pass the source the output was made from as SRC: `rewriter verify SRC {dst.url}`"
    )


def _refuse_other_source(plan: Plan, src: Checkpoint, dst: Storage) -> None:
    """Stop before reading any tensor when SRC is another checkpoint than the one DST was made
    from: its bytes say nothing about DST (a changed source at the same place is a problem found)."""
    here = source_location(src.storage)
    if here == plan.source_url or (not plan.source_recorded and published_source(here) == plan.source_url):
        return  # the recorded place (for a local source: a folder of the recorded name)
    now = src.fingerprint()
    differ = [name for name, fp in plan.source_shards.items() if dict(now.get(name) or {}) != dict(fp)]
    if not differ:
        return  # the same shards, copied or mounted elsewhere
    what = "has no shard" if differ[0] not in now else "has a different shard"
    made_from, hint = plan.source_url, ", or give only DST to verify against the recorded one"
    if not plan.source_recorded:
        made_from, hint = f"a local folder named '{plan.source_url.removeprefix(LOCAL_SOURCE)}'", ""
    raise PlanError(
        f"{src.url} is not the source of {dst.url}: that was made from {made_from} (recorded in "
        f"{dst.describe(PROVENANCE_NAME)}), and {src.url} {what} '{differ[0]}' of it"
        f"{f' ({len(differ)} shards differ)' if len(differ) > 1 else ''}; pass the source the output "
        f"was made from{hint}"
    )


def _verify(plan: Plan, src_store: Storage, dst_store: Storage, buffer_bytes: int,
            progress: Progress | None) -> VerifyReport:
    report = VerifyReport(dst_store.url, src_store.url)
    dst, src = open_both(plan, src_store, dst_store, report)
    recorded = recorded_shards(plan, dst_store, report)
    total = bytes_to_check(plan)
    tick = (lambda n: progress(n, total)) if progress else None
    for out, tensors in shards_to_check(plan, dst, dst_store, report):
        report.add(check_shard(out, recorded[out.name], tensors, src.storage, dst_store, buffer_bytes, tick))
    return report


def open_both(plan: Plan, src_store: Storage, dst_store: Storage, report: VerifyReport) -> tuple[Checkpoint | None, Checkpoint]:
    """Open both checkpoints and check what is not a shard's bytes (config, source, shard names).

    A destination that does not open as a checkpoint (a malformed shard header, a damaged
    index) is a problem found, and ``None``: its shards are then checked one by one against the
    plan (:func:`shards_to_check`), so every shard's problems are reported, not only the first.
    """
    try:
        dst: Checkpoint | None = Checkpoint.open(dst_store.url, storage=dst_store)
    except RewriterError as e:
        report.problems.append(str(e))
        dst = None
    src = Checkpoint.open(src_store.url, storage=src_store)
    _refuse_other_source(plan, src, dst_store)
    try:
        check_source(plan, src)
    except PlanError as e:
        report.problems.append(str(e))
    if dst is None:
        return None, src
    if dst.config != dict(plan.config):
        report.problems.append(f"{dst_store.describe(CONFIG_NAME)} differs from the planned config")
    report.problems += copied_file_problems(plan, dst_store, copied_names(plan))
    try:
        dst.layout.moe_layers(dst)  # each layer's count, from num_experts_per_layer where they differ
    except CheckpointError as e:
        report.problems.append(str(e))
    planned = {o.name for o in plan.outputs}
    if planned != set(dst.shards):
        report.problems.append(f"shards {sorted(dst.shards)} differ from the planned {sorted(planned)}")
    return dst, src


def shards_to_check(plan: Plan, dst: Checkpoint | None, dst_store: Storage,
                    report: VerifyReport) -> list[tuple[OutputShard, dict[str, tuple[int, int]]]]:
    """Each planned shard to read, with ``tensor -> (begin, end)`` of its tensors: from the
    destination's index, or, when the destination did not open, from the plan (the shard's header
    is compared with the planned one as it is read, so those spans hold wherever it matches)."""
    if dst is not None:
        by_shard: dict[str, dict[str, tuple[int, int]]] = {}  # one pass over the index, not one per shard
        for info in dst.tensors.values():
            by_shard.setdefault(info.shard, {})[info.name] = (info.begin, info.end)
        return [(o, by_shard.get(o.name, {})) for o in plan.outputs if o.name in dst.shards]
    todo = []
    for o in plan.outputs:
        if not dst_store.exists(o.name):
            report.problems.append(f"{dst_store.describe(o.name)}: planned shard is missing")
            continue
        begin, spans = len(o.header), {}
        for t in o.tensors:
            spans[t.name] = (begin, begin + t.nbytes)
            begin += t.nbytes
        todo.append((o, spans))
    return todo


def recorded_shards(plan: Plan, dst: Storage, report: VerifyReport) -> dict[str, tuple[list[Range], list[Range]]]:
    """Each planned shard's hash ranges ``pruning.json`` records (checked as untrusted input: its
    problems go to ``report``)."""
    problems, ranges = check_document(plan, jsonfile.loads(dst.read_all(PROVENANCE_NAME)))
    report.problems += [p.replace(PROVENANCE_NAME, dst.describe(PROVENANCE_NAME), 1) for p in problems]
    return ranges


def check_shard(out: OutputShard, recorded: tuple[list[Range], list[Range]], tensors: Mapping[str, tuple[int, int]], src: Storage,
                dst: Storage, buffer_bytes: int, progress: Callable[[int], None] | None = None) -> ShardCheck:
    """One pass over shard ``out``: its header, the hashes ``pruning.json`` records for it, and every
    tensor's bytes against its planned source slice (``progress`` gets each number of bytes read)."""
    check = ShardCheck()
    where = dst.describe(out.name)
    whole, parts = recorded
    hashers = [RangeHashes([(s, e) for s, e, _, _ in rs]) for rs in (whole, parts)]
    planned = {t.name: t for t in out.tensors}
    spans = sorted((b, e, n) for n, (b, e) in tensors.items() if n in planned)
    check.mismatches += [n for n in planned if n not in tensors]
    tensor_hashes = RangeHashes([(b, e) for b, e, _ in spans])
    try:
        head = b""
        pos = 0
        for chunk in dst.iter_range(out.name, 0, out.size, bytearray(buffer_bytes)):
            if len(head) < len(out.header):
                head += bytes(chunk[: len(out.header) - len(head)])
            for h in hashers:
                h.feed(pos, chunk)
            tensor_hashes.feed(pos, chunk)
            pos += len(chunk)
            if progress:
                progress(len(chunk))
    except RewriterError as e:
        check.problems.append(str(e))
        return check
    if head != out.header:
        check.problems.append(f"{where}: header differs from the plan")
        return check
    for (_, _, label, want), got in zip(whole + parts, hashers[0].digests() + hashers[1].digests()):
        if got != want:
            check.problems.append(f"{where}: {label}sha256 {got} differs from the {want} recorded in {PROVENANCE_NAME}")
    buf = bytearray(buffer_bytes)
    for (begin, end, name), got in zip(spans, tensor_hashes.digests()):
        check.tensors += 1
        check.bytes += end - begin
        if got != _planned_digest(src, planned[name].segments, buf):
            check.mismatches.append(name)
        if progress:
            progress(end - begin)
    return check


class RangeHashes:
    """sha256 of each of several disjoint, sorted byte ranges of a stream read in order."""

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = ranges
        self.hashes = [hashlib.sha256() for _ in ranges]
        self.i = 0

    def feed(self, pos: int, chunk: memoryview | bytes) -> None:
        end = pos + len(chunk)
        while self.i < len(self.ranges) and self.ranges[self.i][1] <= pos:
            self.i += 1
        j = self.i
        while j < len(self.ranges) and self.ranges[j][0] < end:
            s, e = self.ranges[j]
            self.hashes[j].update(chunk[max(s, pos) - pos : min(e, end) - pos])
            j += 1

    def digests(self) -> list[str]:
        return [h.hexdigest() for h in self.hashes]
