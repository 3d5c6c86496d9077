"""Large shards in parts: several workers write disjoint byte ranges of one output shard.

Only the Ray executor uses this. A destination that takes parts
(:attr:`rewriter.exec.destination.Destination.takes_parts`) begins the shard, every worker
writes its :class:`Part` into the destination's part output, and the shard is published once
every part is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planners.plan import OutputShard, Segment
from rewriter.core.storage import Storage
from rewriter.exec.copy import DEFAULT_BUFFER_BYTES, CopyStats, Progress, RangeCopier, copy_segments
from rewriter.exec.destination import Destination


@dataclass(frozen=True)
class Part:
    """Bytes ``[start, start + length)`` of output shard ``shard``, made of source ``ops``."""

    shard: str
    index: int
    start: int
    ops: tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(op.length for op in self.ops)


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
) -> tuple[CopyStats, list[dict[str, Any]]]:
    """Write one part of the shard begun as ``handle``. Idempotent: a retry writes the same
    bytes to the same places (or sends the same upload part numbers).

    Returns:
        What was copied, and the upload parts sent (multipart destinations; else empty).
    """
    stats = CopyStats()
    copier = RangeCopier(src, buffer_bytes, stats, progress, zero_copy=zero_copy and dst.zero_copy)
    sink = dst.part_output(part.shard, handle, part.start, upload_part_bytes)
    try:
        copy_segments(copier, part.ops, sink)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        copier.close()
    return stats, sink.parts
