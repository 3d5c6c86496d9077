"""I/O cost of a plan: shards touched per layer, bytes read and written, requests, time, memory.

Everything here is arithmetic on the plan. The time estimate schedules output shards (the unit
of work) over ``workers`` with longest-first assignment. A shard's reads are the requests the
executor makes (:func:`planners.reads.plan_reads`); each costs ``latency_s`` plus its bytes at
``read_bytes_per_s`` (one request's stream). With ``inflight`` requests at once (bounded by the
byte budget: ``inflight_bytes // buffer_bytes``) the reads take ``1/inflight`` of that and the
writes overlap them (the shard costs the longer of the two); ``inflight=0`` models the sequential
path (reads, then writes, one request at a time). ``link_bytes_per_s`` caps all of one worker's
requests together (the network card, or what the store serves to one client).
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field
from typing import Any

from core.storage import is_local_url
from planners.carried import carried_nbytes
from planners.plan import Plan
from planners.reads import DEFAULT_MAX_GAP, Read, over_read, plan_reads

MiB = 1 << 20
#: Resident memory of an executor process besides its copy buffer (interpreter, fsspec, numpy):
#: bench_io measured 53-54 MiB peak with the default 16 MiB buffer; the prediction adds the buffer.
BASE_RSS_BYTES = 48 * MiB


@dataclass(frozen=True)
class LayerCost:
    """One layer's share of a plan (``layer`` is ``None`` for embeddings, norm and head)."""

    layer: int | None
    source_shards: tuple[str, ...]
    output_shards: tuple[str, ...]
    bytes_read: int
    bytes_written: int
    segments: int


@dataclass(frozen=True)
class CostReport:
    layers: tuple[LayerCost, ...]
    source_bytes: int
    bytes_read: int
    header_bytes_read: int
    bytes_written: int
    output_shards: int
    copy_ops: int
    range_requests: int
    over_read_bytes: int
    max_gap: int
    latency_s: float
    inflight: int
    link_bytes_per_s: float
    workers: int
    read_bytes_per_s: float
    write_bytes_per_s: float
    buffer_bytes: int
    est_seconds: float
    peak_rss_per_worker: int
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: Bytes of carried tensors (:mod:`planners.carried`): written from the plan, not read.
    carried_bytes: int = 0

    def layer(self, index: int) -> LayerCost:
        for lc in self.layers:
            if lc.layer == index:
                return lc
        raise KeyError(index)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def estimate(
    plan: Plan,
    *,
    workers: int = 1,
    read_bytes_per_s: float = 1e9,
    write_bytes_per_s: float = 1e9,
    buffer_bytes: int = 16 * MiB,
    latency_s: float = 0.0,
    inflight: int = 0,
    inflight_bytes: int = 256 * MiB,
    max_gap: int = DEFAULT_MAX_GAP,
    link_bytes_per_s: float = 0.0,
) -> CostReport:
    """Cost of executing ``plan``.

    Args:
        workers: parallel executors (output shards are distributed over them).
        read_bytes_per_s: bandwidth of one request's stream; write_bytes_per_s: per worker.
        buffer_bytes: the executors' copy buffer: the largest request.
        latency_s: time to the first byte of each request.
        inflight: requests in flight per worker (0: the sequential path).
        inflight_bytes: the executors' byte budget in flight (bounds ``inflight``).
        max_gap: neighbouring ranges at most this far apart are one request (gap bytes over-read);
            0 for a local source, which the executors read range by range.
        link_bytes_per_s: all of one worker's reads together at most this fast (0: no cap).

    Returns:
        A :class:`CostReport`. ``bytes_read`` counts tensor bytes fetched; headers are counted
        apart in ``header_bytes_read`` (two small reads per source shard).
    """
    max_gap = 0 if is_local_url(plan.source_url) else max_gap
    copies = [o.copy_ops() for o in plan.outputs]
    ops = [op for c in copies for op in c if op.data is None]
    reads = [[r for r in plan_reads(c, max_gap=max_gap, max_request=buffer_bytes) if r.data is None] for c in copies]
    workers = max(1, workers)
    streams = max(1, min(inflight, inflight_bytes // max(1, buffer_bytes)))
    per_shard = [_shard_seconds(rs, o.size, latency_s, (read_bytes_per_s, link_bytes_per_s), write_bytes_per_s, streams,
                                inflight > 0) for o, rs in zip(plan.outputs, reads)]
    notes = [f"only {len(plan.outputs)} output shards: at most that many workers are busy"] * (workers > len(plan.outputs))
    return CostReport(layers=_layer_costs(plan),
        source_bytes=sum(int(fp["size"]) for fp in plan.source_shards.values()),
        bytes_read=sum(op.length for op in ops),
        header_bytes_read=sum(8 + int(fp.get("header_len", 0)) for fp in plan.source_shards.values()),
        bytes_written=sum(o.size for o in plan.outputs),
        output_shards=len(plan.outputs),
        copy_ops=len(ops),
        range_requests=sum(len(rs) for rs in reads),
        over_read_bytes=sum(over_read(rs) for rs in reads),
        max_gap=max_gap,
        latency_s=latency_s,
        inflight=inflight,
        link_bytes_per_s=link_bytes_per_s,
        workers=workers,
        read_bytes_per_s=read_bytes_per_s,
        write_bytes_per_s=write_bytes_per_s,
        buffer_bytes=buffer_bytes,
        est_seconds=_longest_first(per_shard, workers),
        peak_rss_per_worker=BASE_RSS_BYTES + max(buffer_bytes, min(inflight * buffer_bytes, inflight_bytes)),
        notes=tuple(notes), carried_bytes=carried_nbytes(plan),
    )


@dataclass(frozen=True)
class ScaleEstimate:
    """Expected wall time of a plan on ``nodes`` nodes (see :func:`estimate_nodes`)."""

    nodes: int
    node_bytes_per_s: float
    total_bytes_per_s: float | None
    serial_bytes_per_s: float | None
    bytes_written: int
    tasks: int
    busy_nodes: int
    startup_s: float
    est_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def estimate_nodes(
    plan: Plan,
    nodes: int,
    node_bytes_per_s: float,
    *,
    part_bytes: int = 1 << 30,
    startup_s: float = 0.0,
    total_bytes_per_s: float | None = None,
    serial_bytes_per_s: float | None = None,
) -> ScaleEstimate:
    """Wall time of ``plan`` on ``nodes`` nodes that each rewrite ``node_bytes_per_s`` output bytes
    per second (read and write together, as a one-node run measures it).

    The units of work are the Ray executor's: whole output shards, and with more than one node,
    shards over ``part_bytes`` split into parts of at most that size; they go longest first to
    the least loaded node. ``total_bytes_per_s`` caps the whole cluster (the shared storage's
    aggregate bandwidth); ``serial_bytes_per_s`` is the rate of work one process does on every
    byte of the shards written in parts, one shard after another (a driver that re-reads each
    assembled shard for its hash; ``None`` when the writers hash what they write);
    ``startup_s`` is the fixed cost of starting the run (actors, plan, journal, finishing files).
    """
    nodes = max(1, nodes)
    sizes: list[int] = []
    for o in plan.outputs:
        if nodes > 1 and o.size > part_bytes:
            full, rest = divmod(o.size, part_bytes)
            sizes += [part_bytes] * full + ([rest] if rest else [])
        else:
            sizes.append(o.size)
    written = sum(o.size for o in plan.outputs)
    seconds = _longest_first([n / node_bytes_per_s for n in sizes], nodes)
    if total_bytes_per_s:
        seconds = max(seconds, written / total_bytes_per_s)
    in_parts = sum(o.size for o in plan.outputs if nodes > 1 and o.size > part_bytes)
    if serial_bytes_per_s:
        seconds = max(seconds, in_parts / serial_bytes_per_s)
    return ScaleEstimate(nodes, node_bytes_per_s, total_bytes_per_s, serial_bytes_per_s, written, len(sizes),
                         min(nodes, len(sizes)), startup_s, startup_s + seconds)


def _shard_seconds(reads: list[Read], size: int, latency_s: float, read_bw: tuple[float, float], write_bw: float,
                   streams: int, overlapped: bool) -> float:
    """One output shard: its requests spread over ``streams`` (each at ``read_bw[0]``, together at
    most ``read_bw[1]`` when set); writes after or alongside them."""
    fetched = sum(r.size for r in reads)
    read_s = (len(reads) * latency_s + fetched / read_bw[0]) / streams
    if read_bw[1] > 0:
        read_s = max(read_s, fetched / read_bw[1])
    write_s = size / write_bw
    return max(read_s, write_s) if overlapped else read_s + write_s


def _layer_costs(plan: Plan) -> tuple[LayerCost, ...]:
    """Per layer (``None``: tensors outside the layers): shards touched, bytes, segments."""
    # Per layer: [source shards, output shards, bytes read, bytes written, segments].
    per_layer: dict[int | None, list[Any]] = {}
    for o in plan.outputs:
        for t in o.tensors:
            d = per_layer.get(t.layer)
            if d is None:
                d = per_layer[t.layer] = [set(), set(), 0, 0, 0]
            d[1].add(o.name)
            d[3] += t.nbytes
            d[4] += len(t.segments)
            for s in t.segments:
                if s.data is None:
                    d[0].add(s.shard)
                    d[2] += s.length
    return tuple(
        LayerCost(k, tuple(sorted(v[0])), tuple(sorted(v[1])), v[2], v[3], v[4])
        for k, v in sorted(per_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    )


def _longest_first(costs: list[float], workers: int) -> float:
    """Time to finish ``costs`` on ``workers``, each job going to the least loaded worker."""
    load = [0.0] * workers
    heapq.heapify(load)
    for cost in sorted(costs, reverse=True):
        heapq.heappush(load, heapq.heappop(load) + cost)
    return max(load)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def shard_label(name: str) -> str:
    """``model-00003-of-00014.safetensors`` -> ``3``; other names unchanged."""
    parts = name.split("-")
    if len(parts) == 4 and parts[0] == "model" and parts[1].isdigit():
        return str(int(parts[1]))
    return name


def format_report(r: CostReport) -> str:
    """The cost table ``rewriter plan`` prints."""
    rows = [("layer", "source shards", "read", "written", "segments", "output shards")]
    for lc in r.layers:
        rows.append((
            "other" if lc.layer is None else str(lc.layer),
            ",".join(shard_label(s) for s in lc.source_shards),
            human_bytes(lc.bytes_read),
            human_bytes(lc.bytes_written),
            str(lc.segments),
            ",".join(shard_label(s) for s in lc.output_shards),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i in (2, 3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ratio = r.bytes_read / r.source_bytes if r.source_bytes else 0
    lines += [
        "",
        f"source:     {human_bytes(r.source_bytes)} in {len({s for lc in r.layers for s in lc.source_shards})} shards touched",
        f"read:       {human_bytes(r.bytes_read)} of tensor data ({ratio:.1%} of the source) + {human_bytes(r.header_bytes_read)} of headers",
        f"written:    {human_bytes(r.bytes_written)} in {r.output_shards} output shards",
        *([f"carried:    {human_bytes(r.carried_bytes)} of new tensor bytes the plan carries (written, not read "
           f"from the source)"] if r.carried_bytes else []),
        f"requests:   {r.copy_ops} copy ranges; {r.range_requests} range requests at a {human_bytes(r.buffer_bytes)} buffer"
        + (f" (ranges up to {human_bytes(r.max_gap)} apart merged: {human_bytes(r.over_read_bytes)} over-read)"
           if r.max_gap else " (each range read as it is: a local source, or --max-gap-kib 0)"),
        f"estimate:   {r.est_seconds:.1f} s on {r.workers} worker(s) at {r.read_bytes_per_s / 1e6:.0f} MB/s read "
        f"per request, {r.latency_s * 1000:.0f} ms latency, "
        f"{'one request at a time' if r.inflight <= 0 else f'{r.inflight} requests in flight'}"
        f"{f' (at most {r.link_bytes_per_s / 1e6:.0f} MB/s together)' if r.link_bytes_per_s else ''}, "
        f"{r.write_bytes_per_s / 1e6:.0f} MB/s write per worker",
        f"peak RSS:   ~{human_bytes(r.peak_rss_per_worker)} per worker (base + buffers in flight)",
    ]
    lines += [f"note:       {n}" for n in r.notes]
    return "\n".join(lines)
