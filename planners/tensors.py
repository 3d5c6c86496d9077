"""The planned output: byte segments of source shards, the tensors they make, the output shards that hold them, and the tensors a keep set makes of a checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from core.checkpoint import (
    Checkpoint,
    TensorInfo,
)
from core.containers import Container, container_of
from core.errors import FormatError, PlanError
from core.format import PREFIX_BYTES
from core.gguf import padding
from core.layouts import ExpertTensor, Layout, expert_axis
from planners.plan_schema import is_count


@dataclass(frozen=True)
class Segment:
    """``length`` bytes at absolute ``offset`` of source shard ``shard``, or, when ``data`` is
    set, those literal bytes (a soft prune's replaced router bias entries). A carried tensor's
    bytes (:mod:`planners.carried`) are one segment with ``sha256`` set; its ``data`` is ``None``
    where only the digest is known (a plan read back from ``pruning.json``)."""

    shard: str
    offset: int
    length: int
    data: bytes | None = None
    sha256: str | None = None

    @classmethod
    def literal(cls, data: bytes) -> Segment:
        return cls("", 0, len(data), data)

    def to_json(self) -> list | dict:
        if self.sha256 is not None:
            return {"carried": self.sha256, "length": self.length}
        if self.data is not None:
            return ["", 0, self.length, self.data.hex()]
        return [self.shard, self.offset, self.length]

    @classmethod
    def from_json(cls, v: list | dict) -> Segment:
        """Numbers are kept as found; :func:`check_plan` refuses anything but non-negative ints."""
        if type(v) is list and len(v) == 3:
            return cls(v[0], v[1], v[2])
        if isinstance(v, dict):
            return cls("", 0, v["length"], None, v["carried"])
        if len(v) == 4:
            if v[0] != "":
                raise ValueError(f"literal segment names shard {v[0]!r}; literal segments name none")
            data = bytes.fromhex(v[3])
            if len(data) != v[2]:
                raise ValueError(f"literal segment of {len(data)} bytes declares {v[2]}")
            return cls.literal(data)
        if len(v) != 3:
            raise ValueError(f"segment {v!r} is not [shard, offset, length]")
        return cls(v[0], v[1], v[2])


def merge_segments(segments: Iterable[Segment]) -> list[Segment]:
    """Join neighbours: source ranges contiguous in one shard, and consecutive literals.
    Carried bytes stay apart: joining them would copy megabytes to save one write."""
    out: list[Segment] = []
    run: list[Any] | None = None  # [shard, offset, length, the segment while alone]: a source run
    for s in segments:
        if s.data is None and s.sha256 is None:
            if run is not None and run[0] == s.shard and run[1] + run[2] == s.offset:
                run[2] += s.length
                run[3] = None
                continue
            _end_run(out, run)
            run = [s.shard, s.offset, s.length, s]
            continue
        _end_run(out, run)
        run = None
        last = out[-1] if out else None
        if last is not None and last.data is not None and s.sha256 is None and last.sha256 is None:
            out[-1] = Segment.literal(last.data + s.data)  # type: ignore[operator]
        else:
            out.append(s)
    _end_run(out, run)
    return out


def _end_run(out: list[Segment], run: list[Any] | None) -> None:
    # One segment per run, not one per joined neighbour (a 1 T plan joins 140,000).
    if run is not None:
        out.append(run[3] if run[3] is not None else Segment(run[0], run[1], run[2]))


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor and the source bytes that make it, in order; ``pad`` zero bytes follow
    its data where the format aligns tensors (GGUF)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str
    segments: tuple[Segment, ...]
    layer: int | None = None
    pad: int = 0

    @cached_property  # asked again and again of a 1 T plan's 70,000 tensors
    def nbytes(self) -> int:
        return sum(s.length for s in self.segments)

    def write_segments(self) -> tuple[Segment, ...]:
        return (*self.segments, Segment.literal(bytes(self.pad))) if self.pad else self.segments


@dataclass(frozen=True)
class OutputShard:
    """An output file: its precomputed header (prefix included) and its tensors in data order."""

    name: str
    header: bytes
    tensors: tuple[PlannedTensor, ...]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes + t.pad for t in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes

    def copy_ops(self) -> list[Segment]:
        """The data's segments in write order, neighbours merged across tensors."""
        return merge_segments(s for t in self.tensors for s in t.write_segments())


def output_from_json(o: Mapping[str, Any], where: str, container: Container) -> OutputShard:
    size = o["size"] if isinstance(o.get("size"), int) else 0
    try:
        header, entries, align = container.header_from_json(o["header"], size, f"{where}: output {o['name']}")
    except FormatError as e:
        raise PlanError(str(e)) from None
    tensors = tuple(
        PlannedTensor(
            t["name"], t["dtype"], tuple(t["shape"]), t["source"],
            tuple(Segment.from_json(v) for v in t["segments"]), t.get("layer"), t.get("pad", 0),
        )
        for t in o["tensors"]
    )
    planned = [(t.name, t.dtype, t.shape, t.nbytes) for t in tensors]
    if entries != planned:
        raise PlanError(f"{where}: the header of output '{o['name']}' does not match its tensors' segments")
    if any(t.pad != padding(t.nbytes, align) for t in tensors):
        raise PlanError(f"{where}: output '{o['name']}': a tensor's padding is not what alignment {align} needs")
    out = OutputShard(o["name"], header, tensors)
    if o.get("size") != out.size:
        raise PlanError(f"{where}: output '{o['name']}' declares size {o.get('size')!r}, but its header "
                        f"and segments make {out.size:,} bytes")
    return out


def check_segment(s: Segment, source_shards: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """Refuse a segment of a plan read from a file that reads outside its source shard's data."""
    if not is_count(s.offset) or not is_count(s.length):
        raise PlanError(f"{where}: segment offset {s.offset!r} and length {s.length!r} must be "
                        f"non-negative integers")
    if s.data is not None or s.sha256 is not None:
        return
    fp = source_shards.get(s.shard)
    if fp is None:
        raise PlanError(f"{where}: segment names source shard {s.shard!r}, which is not among the "
                        f"plan's source shards {sorted(source_shards)}")
    start, end = PREFIX_BYTES + fp["header_len"], fp["size"]
    if s.offset < start or s.offset + s.length > end:
        raise PlanError(f"{where}: segment [{s.offset:,}, {s.offset + s.length:,}) of {s.shard!r} "
                        f"lies outside its data bytes [{start:,}, {end:,})")


def _output_order(tensors: Iterable[TensorInfo], classified: Mapping[str, ExpertTensor]) -> list[tuple[TensorInfo, int | None]]:
    """Each tensor with its layer, in output order: embeddings, the layers in turn, the rest;
    within each, by place in the source (ties keep the index's order). A classified tensor's
    layer is its classification's (most of a 1 T checkpoint's names: no parsing)."""
    tensors = list(tensors)
    keyed = []  # flat keys: (group, layer, shard, offset, index), group 0 embeddings, 1 layers, 2 the rest
    get = classified.get
    for i, t in enumerate(tensors):
        e = get(t.name)
        layer = t.layer if e is None else e.layer
        if layer is not None:
            keyed.append((1, layer, t.shard, t.begin, i))
        else:
            keyed.append((0 if "embed" in t.name else 2, 0, t.shard, t.begin, i))
    keyed.sort()
    return [(tensors[k[4]], k[1] if k[0] == 1 else None) for k in keyed]


def _whole(info: TensorInfo, layer: int | None, name: str | None = None) -> PlannedTensor:
    """A tensor copied unchanged (under ``name`` when a renumbered expert's tensor)."""
    return PlannedTensor(name or info.name, info.dtype, info.shape, info.name,
                         (Segment(info.shard, info.begin, info.end - info.begin),), layer)


def _rows(info: TensorInfo, ids: Sequence[int]) -> tuple[Segment, ...]:
    """The expert rows ``ids`` of a tensor with experts along dim 0, adjacent rows joined."""
    row = info.nbytes // info.shape[expert_axis(info.shape)]
    return tuple(merge_segments(Segment(info.shard, info.begin + e * row, row) for e in ids))


#: The most negative finite value per dtype: a router bias that no expert overcomes.
NEVER_SELECTED = {"BF16": bytes.fromhex("7fff"), "F16": bytes.fromhex("fffb"), "F32": bytes.fromhex("ffff7fff")}


def _soft_bias(info: TensorInfo, keep: Sequence[int]) -> PlannedTensor:
    if info.dtype not in NEVER_SELECTED or len(info.shape) != 1:
        raise PlanError(f"soft prune: router bias {info.name!r} is {info.dtype}{list(info.shape)}; "
                        f"expected a 1-D BF16, F16 or F32 tensor")
    row = info.nbytes // info.shape[0]
    segs = merge_segments(
        Segment(info.shard, info.begin + e * row, row) if e in keep else Segment.literal(NEVER_SELECTED[info.dtype])
        for e in range(info.shape[0])
    )
    return PlannedTensor(info.name, info.dtype, info.shape, info.name, tuple(segs), info.layer)


def plan_tensors(ckpt: Checkpoint, layout: Layout, keep: Mapping[int, Sequence[int]],
                 layers_only: Sequence[int] | None = None, soft: bool = False) -> list[PlannedTensor]:
    """Output tensors in layer-local order, each with its source segments.

    ``soft``: every tensor is copied whole except each layer's router bias, whose dropped
    entries become the dtype's most negative value, so those experts are never selected.
    """
    out = []
    biases_done = set()
    new_ids = {layer: {e: i for i, e in enumerate(ids)} for layer, ids in keep.items()}
    classified = layout.classified_tensors(ckpt)
    for info, layer in _output_order(ckpt.tensors.values(), classified):
        role = classified.get(info.name)
        if layers_only is not None and (role is None or role.layer not in layers_only):
            continue
        if soft:
            if role is not None and role.role == "router" and info.name.endswith("bias"):
                out.append(_soft_bias(info, keep[role.layer]))
                biases_done.add(role.layer)
            else:
                out.append(_whole(info, layer))
            continue
        if role is None:
            out.append(_whole(info, layer))
            continue
        ids = keep[role.layer]
        if role.role == "expert":
            new = new_ids[role.layer].get(role.expert)  # type: ignore[arg-type]
            if new is not None:
                out.append(_whole(info, layer, layout.renamed(role, new)))
            continue
        axis = expert_axis(info.shape)
        shape = (*info.shape[:axis], len(ids), *info.shape[axis + 1:])
        out.append(PlannedTensor(info.name, info.dtype, shape, info.name, _rows(info, ids), role.layer))
    if soft and set(keep) - biases_done:
        raise PlanError(
            f"soft prune needs a router bias in every MoE layer; {layout.family} layers "
            f"{sorted(set(keep) - biases_done)[:5]} have none (soft prune works for gpt-oss and "
            f"DeepSeek-V3/GLM-4.5); use a structural prune instead"
        )
    align = container_of(ckpt).alignment(ckpt)
    return [dataclasses.replace(t, pad=padding(t.nbytes, align)) for t in out] if align > 1 else out
