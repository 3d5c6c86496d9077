"""Large shards in parts: several workers write disjoint byte ranges of one output shard.

Only the Ray executor uses this. A destination that takes parts
(:class:`rewriter.exec.dest.ShardParts`) begins the shard, every worker
writes its :class:`Part` into the destination's part output, hashing it as it goes, and the
shard is published once every part is in. The journal keeps each finished part's sha256, so a
killed run's successor writes only the parts that are missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from core.errors import ExecutionError
from core.storage import Storage
from planners.tensors import OutputShard, Segment
from rewriter.exec.dest import Destination, ShardParts
from rewriter.exec.io import CopyStats, IOOptions, Progress, RangeCopier, copy_segments
from rewriter.exec.options import DEFAULT_BUFFER_BYTES


@dataclass(frozen=True)
class Part:
    """Bytes ``[start, start + length)`` of output shard ``shard``, made of source ``ops``."""

    shard: str
    index: int
    start: int
    ops: tuple[Segment, ...]
    #: The sha256 a killed run journaled for this part: the bytes already there are checked
    #: against it and written again only when they differ.
    expect_sha256: str = ""

    @property
    def length(self) -> int:
        return sum(op.length for op in self.ops)

    def describe(self) -> str:
        return f"part {self.index} (bytes {self.start:,}-{self.start + self.length:,}) of {self.shard}"


def split_parts(out: OutputShard, part_bytes: int) -> list[Part]:
    """Cut a shard's bytes, header included, at every multiple of ``part_bytes``.

    Part ``i`` covers ``[i * part_bytes, (i + 1) * part_bytes)`` of the file; part 0 starts with
    the header (a literal segment). Every part but the last is exactly ``part_bytes`` long, which
    multipart uploads need (each of their parts but the last must be at least 5 MiB).
    """
    parts: list[Part] = []
    ops: list[Segment] = []
    start = pos = 0
    for op in (Segment.literal(out.header), *out.copy_ops()):
        done = 0
        while done < op.length:
            take = min(op.length - done, part_bytes - (pos - start))
            if op.data is not None:
                ops.append(Segment.literal(op.data[done : done + take]))
            else:
                ops.append(Segment(op.shard, op.offset + done, take))
            done += take
            pos += take
            if pos - start == part_bytes:
                parts.append(Part(out.name, len(parts), start, tuple(ops)))
                ops, start = [], pos
    if ops:
        parts.append(Part(out.name, len(parts), start, tuple(ops)))
    return parts


def write_part(
    part: Part, handle: str, src: Storage, dst: Destination, *, upload_part_bytes: int,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES, progress: Progress | None = None, zero_copy: bool = True,
    io: IOOptions | None = None,
) -> dict[str, Any]:
    """Write one part of the shard begun as ``handle``, hashing it as it is written. Idempotent:
    a retry writes the same bytes to the same places (or sends the same upload part numbers).

    Returns:
        The part's journal entry (``start``, ``length``, ``sha256``, the upload parts sent on
        multipart destinations, ``resumed`` when the bytes already there were right) and the
        copy's statistics (``stats``).
    """
    if not isinstance(dst, ShardParts):
        raise ExecutionError(f"{dst.url} takes no shards in parts")
    entry = {"start": part.start, "length": part.length}
    if part.expect_sha256 and dst.part_sha256(handle, part.start, part.length, buffer_bytes) == part.expect_sha256:
        if progress:
            progress(part.length)
        return {**entry, "sha256": part.expect_sha256, "uploaded": [], "resumed": True, "stats": asdict(CopyStats())}
    stats = CopyStats()
    copier = RangeCopier(src, buffer_bytes, stats, progress, zero_copy=zero_copy and dst.zero_copy, io=io)
    sink = dst.part_output(part.shard, handle, part.start, upload_part_bytes)
    try:
        copy_segments(copier, part.ops, sink)
        digest = sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        copier.close()
    return {**entry, "sha256": digest, "uploaded": sink.parts, "resumed": False, "stats": asdict(stats)}
