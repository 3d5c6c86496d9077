"""The read requests that carry out an output's copy ranges.

An output shard's data is a sequence of source byte ranges (and literal bytes) in write order.
:func:`plan_reads` turns it into requests: a range longer than ``max_request`` is split so that
several of its pieces can be in flight at once, and neighbouring ranges of one source shard
whose gap is at most ``max_gap`` bytes become one request (small tensors such as MXFP4 scales
and biases of kept experts then arrive together; the gap's bytes are fetched and dropped).

Requests keep the write order: a request's slices are written in order, and requests follow one
another in the output. The executor and the cost estimate both use this function, so the plan's
request count and over-read bytes are the run's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from planners.tensors import Segment

#: Default gap merged into one request: a few kept experts' biases and small scales apart.
DEFAULT_MAX_GAP = 64 << 10


@dataclass(frozen=True)
class Read:
    """Bytes ``[start, end)`` of source ``shard``; ``slices`` are the ``(offset from start,
    length)`` pieces written, in order. A literal (``data`` set) is written as it is."""

    shard: str
    start: int
    end: int
    slices: tuple[tuple[int, int], ...]
    data: bytes | None = None

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def wanted(self) -> int:
        return sum(n for _, n in self.slices)

    @property
    def contiguous(self) -> bool:
        """Whether the slices cover ``[start, end)`` back to back (no gap bytes)."""
        pos = 0
        for off, n in self.slices:
            if off != pos:
                return False
            pos += n
        return pos == self.size


def _pieces(ops: Iterable[Segment], max_request: int) -> Iterable[Segment]:
    for op in ops:
        if op.data is not None or op.length <= max_request:
            yield op
            continue
        for at in range(0, op.length, max_request):
            yield Segment(op.shard, op.offset + at, min(max_request, op.length - at))


def plan_reads(ops: Sequence[Segment], *, max_gap: int, max_request: int) -> list[Read]:
    """The requests for ``ops`` (in write order); see the module docstring."""
    max_request = max(1, max_request)
    out: list[Read] = []
    cur: tuple[str, int, int, list[tuple[int, int]]] | None = None  # shard, start, end, slices

    def flush() -> None:
        nonlocal cur
        if cur is not None:
            out.append(Read(cur[0], cur[1], cur[2], tuple(cur[3])))
            cur = None

    for op in _pieces(ops, max_request):
        if op.data is not None:
            flush()
            out.append(Read("", 0, op.length, ((0, op.length),), op.data))
            continue
        end = op.offset + op.length
        if (cur is not None and cur[0] == op.shard and cur[2] <= op.offset <= cur[2] + max_gap
                and end - cur[1] <= max_request):
            cur[3].append((op.offset - cur[1], op.length))
            cur = (cur[0], cur[1], end, cur[3])
            continue
        flush()
        cur = (op.shard, op.offset, end, [(0, op.length)])
    flush()
    return out


def over_read(reads: Iterable[Read]) -> int:
    """Gap bytes fetched and dropped."""
    return sum(r.size - r.wanted for r in reads if r.data is None)
