"""The plan: everything a rewrite does, decided from headers, index, config and keep sets.

A plan is data (versioned JSON). Local runs, Ray runs, dry runs, cost estimates and ``verify``
all read the same plan. Building one reads no tensor bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import fsspec

from planners.plan_schema import check_document
from planners.policies import KeepDecision
from planners.quantization import check_side_files, rewritten_quantization
from rewriter.core.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    Checkpoint,
    TensorInfo,
    hub_name_problem,
    relative_name_problem,
)
from rewriter.core.containers import CONTAINERS, Container, container_of
from rewriter.core.errors import FormatError, PlanError
from rewriter.core.format import PREFIX_BYTES
from rewriter.core.gguf import padding
from rewriter.core.jsonfile import parse_json, read_url
from rewriter.core.layouts import PER_LAYER_FIELD, Layout, expert_axis

PLAN_FORMAT = "moe-rewriter-plan"
#: 2: ``copy_file_digests`` (each copied file's size and sha256) and a derived config.
PLAN_VERSION = 2
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
#: Folders of the gpt-oss Hub repos holding other layouts of the same weights; a pruned
#: checkpoint must not carry them, since they would no longer match.
SKIPPED_DIRS = ("original/", "metal/")
PROVENANCE_NAME = "pruning.json"
#: The output's model card; the source's own card is kept under :func:`base_card_name`.
CARD_NAME = "README.md"


def base_card_name(taken: Iterable[str]) -> str:
    """Where the source's model card goes: ``README.base.md``, or the first free numbered name."""
    names = set(taken)
    n = 1
    while (name := "README.base.md" if n == 1 else f"README.base.{n}.md") in names:
        n += 1
    return name


@dataclass(frozen=True)
class Segment:
    """``length`` bytes at absolute ``offset`` of source shard ``shard``, or, when ``data`` is
    set, those literal bytes (a soft prune's replaced router bias entries)."""

    shard: str
    offset: int
    length: int
    data: bytes | None = None

    @classmethod
    def literal(cls, data: bytes) -> Segment:
        return cls("", 0, len(data), data)

    def to_json(self) -> list:
        if self.data is not None:
            return ["", 0, self.length, self.data.hex()]
        return [self.shard, self.offset, self.length]

    @classmethod
    def from_json(cls, v: list) -> Segment:
        """Numbers are kept as found; :func:`check_plan` refuses anything but non-negative ints."""
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
    """Join neighbours: source ranges contiguous in one shard, and consecutive literals."""
    out: list[Segment] = []
    for s in segments:
        last = out[-1] if out else None
        if (last and last.data is None and s.data is None and last.shard == s.shard
                and last.offset + last.length == s.offset):
            out[-1] = Segment(s.shard, last.offset, last.length + s.length)
        elif last and last.data is not None and s.data is not None:
            out[-1] = Segment.literal(last.data + s.data)
        else:
            out.append(s)
    return out


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

    @property
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


@dataclass(frozen=True)
class Plan:
    """A complete rewrite. See ``docs/plan.md`` for the JSON schema."""

    source_url: str
    source_shards: Mapping[str, Mapping[str, Any]]
    family: str
    outputs: tuple[OutputShard, ...]
    config: Mapping[str, Any]
    config_patch: Mapping[str, Any]
    keep: Mapping[int, tuple[int, ...]]
    top_k: int
    copy_files: tuple[str, ...] = ()
    skipped_files: tuple[str, ...] = ()
    reasons: Mapping[int, Mapping[int, tuple[str, ...]]] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    loadable: bool = True
    layers_only: tuple[int, ...] | None = None
    soft: bool = False
    #: Each copied file's ``{"size", "sha256"}`` in the source: a run and ``verify`` refuse others.
    copy_digests: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: The file format of source and output (:data:`rewriter.core.containers.CONTAINERS`).
    container: str = "safetensors"
    version: int = PLAN_VERSION
    #: The file the plan was read from (not part of the plan); ``None`` for a plan built here.
    #: A plan read from a file is untrusted input: :meth:`check_source` also checks its mapping.
    origin: str | None = field(default=None, compare=False)

    @property
    def total_size(self) -> int:
        return sum(o.data_bytes for o in self.outputs)

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.name: o.name for o in self.outputs for t in o.tensors}

    @property
    def is_dry_run(self) -> bool:
        return self.layers_only is not None

    @property
    def index_name(self) -> str:
        """The file a run writes last; its presence means the output is complete."""
        return CONTAINERS[self.container].index_name

    def metadata_files(self) -> dict[str, bytes]:
        """Files besides the shards that hold the model's configuration: ``config.json`` (a GGUF
        output holds its metadata in its first file's header)."""
        return {CONFIG_NAME: self.config_json()} if self.container == "safetensors" else {}

    def index_json(self) -> bytes:
        doc = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        return (json.dumps(doc, indent=2) + "\n").encode()

    def config_json(self) -> bytes:
        return (json.dumps(self.config, indent=2, sort_keys=False) + "\n").encode()

    def expert_mapping(self) -> dict[str, list[int]]:
        """Per layer, ``new id -> original id`` as a list."""
        return {str(k): list(v) for k, v in sorted(self.keep.items())}

    # --- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        container = CONTAINERS[self.container]
        # Named only when not safetensors, so that plans of safetensors sources keep their digests.
        named = {"container": self.container} if self.container != "safetensors" else {}
        return {
            **named,
            "format": PLAN_FORMAT,
            "version": self.version,
            "source": {"url": self.source_url, "shards": {k: dict(v) for k, v in self.source_shards.items()}},
            "family": self.family,
            "loadable_by_transformers": self.loadable,
            "layers_only": list(self.layers_only) if self.layers_only is not None else None,
            "mode": "soft" if self.soft else "structural",
            "top_k": self.top_k,
            "config_patch": dict(self.config_patch),
            "config": dict(self.config),
            "expert_mapping": self.expert_mapping(),
            "keep_reasons": {
                str(layer): {str(e): list(r) for e, r in rs.items()} for layer, rs in sorted(self.reasons.items())
            },
            "copy_files": list(self.copy_files),
            "copy_file_digests": {k: dict(v) for k, v in sorted(self.copy_digests.items())},
            "skipped_files": list(self.skipped_files),
            "outputs": [
                {
                    "name": o.name,
                    "size": o.size,
                    "header": container.header_to_json(o.header),
                    "tensors": [
                        {
                            "name": t.name,
                            "source": t.source,
                            "layer": t.layer,
                            "dtype": t.dtype,
                            "shape": list(t.shape),
                            "segments": [s.to_json() for s in t.segments],
                            **({"pad": t.pad} if t.pad else {}),
                        }
                        for t in o.tensors
                    ],
                }
                for o in self.outputs
            ],
            "provenance": dict(self.provenance),
        }

    @property
    def source_recorded(self) -> bool:
        """Whether the plan says where its source is (not a local one recorded by content only)."""
        return not self.source_url.startswith(LOCAL_SOURCE)

    def published_json(self) -> dict[str, Any]:
        """The plan as ``pruning.json`` publishes it: no path of this machine. A local source is
        named by its folder (its shards' fingerprints and copied files' sha256 identify it), and
        saliency files and keep lists by file name (their sha256 stays). Same digest."""
        doc = self.to_json()
        if is_local_path(self.source_url):
            doc["source"]["url"] = published_source(self.source_url)
        prov = doc["provenance"]
        for key in ("saliency", "keep_list"):
            if key in prov:
                prov[key] = _names_only(prov[key])
        return doc

    def identity_json(self) -> dict[str, Any]:
        """The plan without what depends on when and where it was made: the provenance's
        creation time (older plans carry one), the paths its saliency files or keep list were
        read from (their sha256 stays) and where its source is (its fingerprints stay)."""
        doc = self.to_json()
        doc["source"] = {k: v for k, v in doc["source"].items() if k != "url"}
        prov = {k: v for k, v in doc["provenance"].items() if k not in _UNSTABLE_PROVENANCE}
        for key in ("saliency", "keep_list"):
            if key in prov:
                prov[key] = _without_paths(prov[key])
        doc["provenance"] = prov
        return doc

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.identity_json(), sort_keys=True, separators=(",", ":")).encode()

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical JSON of :meth:`identity_json`: the plan's identity in
        journals and provenance. Two plans of the same inputs have the same digest."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def save(self, url: str) -> None:
        with fsspec.open(url, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = "plan") -> Plan:
        """Rebuild a plan, checking format, version and that every header matches its tensors."""
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise PlanError(f"{where}: not a plan (expected \"format\": \"{PLAN_FORMAT}\")")
        if doc.get("version") == 1:
            raise PlanError(f"{where}: plan version 1 was made by an earlier rewriter, which recorded neither "
                            f"the copied files' sha256 nor a config derived from the source; make the plan "
                            f"again with `rewriter plan` (this tool reads version {PLAN_VERSION})")
        if doc.get("version") != PLAN_VERSION:
            raise PlanError(f"{where}: plan version {doc.get('version')!r}; this tool reads version {PLAN_VERSION}")
        check_document(doc, where)
        container = doc.get("container", "safetensors")
        if container not in CONTAINERS:
            raise PlanError(f"{where}: plan field 'container' is {container!r}; expected one of "
                            f"{sorted(CONTAINERS)}. Refusing this plan: make it again with `rewriter plan`")
        try:
            outputs = tuple(_output_from_json(o, where, CONTAINERS[container]) for o in doc["outputs"])
            keep = {int(k): tuple(v) for k, v in doc["expert_mapping"].items()}
            reasons = {
                int(layer): {int(e): tuple(r) for e, r in rs.items()} for layer, rs in doc.get("keep_reasons", {}).items()
            }
            layers_only = doc.get("layers_only")
            plan = cls(
                source_url=doc["source"]["url"],
                source_shards=doc["source"]["shards"],
                family=doc["family"],
                outputs=outputs,
                config=doc["config"],
                config_patch=doc["config_patch"],
                keep=keep,
                top_k=int(doc["top_k"]),
                copy_files=tuple(doc.get("copy_files", ())),
                skipped_files=tuple(doc.get("skipped_files", ())),
                copy_digests=doc["copy_file_digests"],
                reasons=reasons,
                provenance=doc.get("provenance", {}),
                loadable=bool(doc.get("loadable_by_transformers", True)),
                layers_only=tuple(layers_only) if layers_only is not None else None,
                soft=doc.get("mode", "structural") == "soft",
                container=container,
                origin=where,
            )
            check_plan(plan, where)
            return plan
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{where}: malformed plan ({type(e).__name__}: {e}); make the plan again "
                            f"with `rewriter plan`") from None

    @classmethod
    def load(cls, url: str) -> Plan:
        doc = parse_json(read_url(url, PlanError, missing="plan file not found"), url, PlanError)
        return cls.from_json(doc, url)

    def check_source(self, ckpt: Checkpoint) -> None:
        """Refuse a source whose shards differ from the ones the plan was made from, and a plan
        read from a file whose tensors are not the ones its expert mapping takes from that source
        (a plan built here by :func:`build_plan` is consistent by construction).

        When ``ckpt`` is not at the plan's source URL, the message says that the source given
        differs from the plan's (naming both) rather than that the source changed.
        """
        self._check_shards(ckpt)
        if self.origin is not None:
            check_mapping(self, ckpt, self.origin)
            check_config(self, ckpt, self.origin)
            check_copied_files(self, ckpt.storage, self.origin)

    def _check_shards(self, ckpt: Checkpoint) -> None:
        now = ckpt.fingerprint()
        elsewhere = source_location(ckpt.storage) != self.source_url
        for name, fp in self.source_shards.items():
            found = now.get(name)
            if found is not None and dict(found) == dict(fp):
                continue
            if elsewhere:
                what = "has no shard" if found is None else "has a different shard"
                raise PlanError(
                    f"the source given, {ckpt.url}, is not the one the plan was made from, "
                    f"{self.source_url}: it {what} '{name}'; pass the plan's source (or plan "
                    f"again from {ckpt.url})"
                )
            if found is None:
                raise PlanError(f"{ckpt.url}: shard '{name}' of the plan's source is missing; plan again")
            raise PlanError(
                f"{ckpt.storage.describe(name)} changed since the plan was made (planned "
                f"size {fp['size']:,}, header {fp['header_sha256'][:12]}; found size "
                f"{found['size']:,}, header {found['header_sha256'][:12]}); plan again"
            )


_UNSTABLE_PROVENANCE = ("created_utc",)
#: How ``pruning.json`` names a local source: ``local:<folder name>`` (or the Hugging Face cache
#: part of its path, which names the Hub repo), never the machine's path.
LOCAL_SOURCE = "local:"
_HF_CACHE_PART = re.compile(r"models--[^/]+?--[^/]+/snapshots/[^/]+/?$")


def is_local_path(url: str) -> bool:
    return "://" not in url and not url.startswith(LOCAL_SOURCE)


def published_source(url: str) -> str:
    m = _HF_CACHE_PART.search(url)
    return LOCAL_SOURCE + (m.group(0).rstrip("/") if m else url.rstrip("/").rsplit("/", 1)[-1])


def _names_only(entry: Any) -> Any:
    if isinstance(entry, list):
        return [_names_only(e) for e in entry]
    if isinstance(entry, dict) and isinstance(entry.get("path"), str):
        return {**entry, "path": entry["path"].rstrip("/").rsplit("/", 1)[-1]}
    return entry


def _without_paths(entry: Any) -> Any:
    if isinstance(entry, list):
        return [_without_paths(e) for e in entry]
    if isinstance(entry, dict):
        return {k: v for k, v in entry.items() if k != "path"}
    return entry


def require_source(plan: Plan, what: str) -> str:
    """The plan's source URL, or a clear error when it records a local source by content only."""
    if plan.source_recorded:
        return plan.source_url
    raise PlanError(f"{plan.origin or 'the plan'} records its source as {plan.source_url!r}: a local folder, "
                    f"identified by content only (pruning.json publishes no path of the machine that made it); "
                    f"{what}")


def source_location(storage: Any) -> str:
    """The URL a plan records for a source: local paths made absolute (so a plan, and the
    ``pruning.json`` that carries it, works from any folder and on shared storage)."""
    if storage.is_local:
        root = os.path.abspath(storage.root)
        return os.path.join(root, storage.entry) if storage.entry else root
    return str(storage.url)


# --- validating a plan read from JSON (untrusted: plans travel between machines and users) ----

def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_name(name: Any, what: str, where: str) -> None:
    problem = relative_name_problem(name)
    if problem is None and "\\" in name:
        problem = "has a backslash"
    if problem:
        raise PlanError(f"{where}: {what} {name!r} {problem}; names in a plan must be relative "
                        f"'/'-separated paths without '..' components. Refusing this plan: make it again")


def _check_written_name(name: str, field: str, where: str) -> None:
    """A name that becomes a file of the output: only what Hugging Face repositories use."""
    problem = hub_name_problem(name)
    if problem:
        raise PlanError(f"{where}: {field} {name!r} {problem}; names of output files may hold only "
                        f"ASCII letters, digits, '-', '_', '.' and '/' between folders, with no "
                        f"component empty or starting with '.'. Refusing this plan: make it again")


def check_plan(plan: Plan, where: str) -> None:
    """Refuse names that could escape the destination or the source, and numbers that are
    negative or disagree with the plan's source fingerprint and headers."""
    container = CONTAINERS[plan.container]
    reserved = {CONFIG_NAME, INDEX_NAME, PROVENANCE_NAME, container.index_name}
    for name, fp in plan.source_shards.items():
        _check_name(name, "source shard", where)
        if not all(_is_count(fp.get(k)) for k in ("size", "header_len")) or not isinstance(fp.get("header_sha256"), str):
            raise PlanError(f"{where}: source shard {name!r} needs a non-negative size and header_len and a header_sha256")
    names: set[str] = set()
    for i, o in enumerate(plan.outputs):
        _check_name(o.name, "output shard", where)
        _check_written_name(o.name, f"output shard name (outputs[{i}].name)", where)
        if "/" in o.name or not o.name.endswith(container.suffix) or o.name in names:
            raise PlanError(f"{where}: output shard {o.name!r} must be a unique '{container.suffix}' file "
                            f"name in the destination's top folder. Refusing this plan: make it again")
        names.add(o.name)
        for t in o.tensors:
            for s in t.segments:
                _check_segment(plan, s, f"{where}: output {o.name!r}, tensor {t.name!r}")
    for name in (*plan.copy_files, *plan.skipped_files):
        _check_name(name, "file", where)
    for i, name in enumerate(plan.copy_files):
        _check_written_name(name, f"copied file (copy_files[{i}])", where)
        if name in reserved or name in names or name.split("/")[0].startswith("."):
            raise PlanError(f"{where}: copied file {name!r} would replace a file this tool writes "
                            f"(or its state folder). Refusing this plan: make it again")
        if name.split("/")[0].startswith("."):
            raise PlanError(f"{where}: copied file {name!r} is hidden (a dot file, such as .env, may hold "
                            f"credentials), and plans never copy hidden files. Refusing this plan: make it again")
    if not _is_count(plan.top_k) or plan.top_k == 0:
        raise PlanError(f"{where}: top_k {plan.top_k!r} must be a positive integer")


def check_mapping(plan: Plan, ckpt: Checkpoint, where: str) -> None:
    """Refuse a plan whose expert mapping is not what its tensors take from ``ckpt``.

    The mapping is what users read (in ``pruning.json`` and the model card) to learn which
    experts they got, so it must be exactly what the plan's bytes hold: the plan's tensors are
    rebuilt from the source and its mapping and compared.
    """
    layout = ckpt.layout
    what = "Refusing this plan: make it again with `rewriter plan`"
    if layout.family != plan.family:
        raise PlanError(f"{where}: the plan is for family {plan.family!r}, but its source {ckpt.url} is "
                        f"{layout.family!r}. {what}")
    moe = sorted(layout.moe_layers(ckpt))
    n = layout.num_experts(ckpt.config, ckpt.storage.describe(CONFIG_NAME))
    if sorted(plan.keep) != moe:
        raise PlanError(f"{where}: expert_mapping covers layers {sorted(plan.keep)}, but the MoE "
                        f"layers of {ckpt.url} are {moe}. {what}")
    for layer, ids in sorted(plan.keep.items()):
        if any(e >= n for e in ids):
            raise PlanError(f"{where}: expert_mapping for layer {layer} names expert "
                            f"{max(ids)}, but {ckpt.url} has {n} experts per layer. {what}")
    expected = {t.name: t for t in plan_tensors(ckpt, layout, plan.keep, plan.layers_only, plan.soft)}
    planned = {t.name: t for o in plan.outputs for t in o.tensors}
    for name in sorted(expected.keys() | planned.keys()):
        if expected.get(name) != planned.get(name):
            found = "is missing" if name not in planned else (
                "is not among the tensors it implies" if name not in expected else "takes other bytes")
            raise PlanError(f"{where}: expert_mapping does not match its tensors: tensor {name!r} "
                            f"{found} (mode {'soft' if plan.soft else 'structural'}). {what}")


def _check_segment(plan: Plan, s: Segment, where: str) -> None:
    if not _is_count(s.offset) or not _is_count(s.length):
        raise PlanError(f"{where}: segment offset {s.offset!r} and length {s.length!r} must be "
                        f"non-negative integers")
    if s.data is not None:
        return
    fp = plan.source_shards.get(s.shard)
    if fp is None:
        raise PlanError(f"{where}: segment names source shard {s.shard!r}, which is not among the "
                        f"plan's source shards {sorted(plan.source_shards)}")
    start, end = PREFIX_BYTES + fp["header_len"], fp["size"]
    if s.offset < start or s.offset + s.length > end:
        raise PlanError(f"{where}: segment [{s.offset:,}, {s.offset + s.length:,}) of {s.shard!r} "
                        f"lies outside its data bytes [{start:,}, {end:,})")


def _output_from_json(o: Mapping[str, Any], where: str, container: Container) -> OutputShard:
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


# --- building --------------------------------------------------------------------------------

def _layer_key(t: TensorInfo) -> tuple[int, float]:
    if t.layer is not None:
        return (1, t.layer)
    return (0, 0) if "embed" in t.name else (2, 0)


def _whole(info: TensorInfo, name: str | None = None) -> PlannedTensor:
    """A tensor copied unchanged (under ``name`` when a renumbered expert's tensor)."""
    return PlannedTensor(name or info.name, info.dtype, info.shape, info.name,
                         (Segment(info.shard, info.begin, info.nbytes),), info.layer)


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
    for info in sorted(ckpt.tensors.values(), key=lambda t: (_layer_key(t), t.shard, t.begin)):
        role = layout.classify(info.name)
        if layers_only is not None and (role is None or role.layer not in layers_only):
            continue
        if soft:
            if role is not None and role.role == "router" and info.name.endswith("bias"):
                out.append(_soft_bias(info, keep[role.layer]))
                biases_done.add(role.layer)
            else:
                out.append(_whole(info))
            continue
        if role is None:
            out.append(_whole(info))
            continue
        ids = keep[role.layer]
        if role.role == "expert":
            if role.expert is not None and role.expert in ids:
                out.append(_whole(info, layout.renamed(role, list(ids).index(role.expert))))
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


def assign_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Pack tensors into shards of at most ``max_shard_bytes``, keeping each layer together.

    A layer that does not fit in the current shard's remaining room but fits in an empty one
    starts a new shard; only a layer larger than a whole shard is split.
    """
    by_layer: list[list[PlannedTensor]] = []
    for t in tensors:
        if by_layer and by_layer[-1][0].layer == t.layer:
            by_layer[-1].append(t)
        else:
            by_layer.append([t])
    shards: list[list[PlannedTensor]] = [[]]
    room = max_shard_bytes
    for grp in by_layer:
        size = sum(t.nbytes for t in grp)
        if shards[-1] and size <= max_shard_bytes and size > room:
            shards.append([])
            room = max_shard_bytes
        for t in grp:
            if shards[-1] and t.nbytes > room:
                shards.append([])
                room = max_shard_bytes
            shards[-1].append(t)
            room -= t.nbytes
    return [s for s in shards if s]


def _check_uniform_container(ckpt: Checkpoint, uniform: bool) -> None:
    """A GGUF output holds one expert count for every layer (llama.cpp reads one)."""
    if ckpt.container != "safetensors" and not uniform:
        raise PlanError(f"{ckpt.url}: a {ckpt.container} output needs the same expert count in every MoE "
                        f"layer (llama.cpp reads one expert_count); keep the same number in each layer")


def _check_layers(url: str, moe: list[int], decision: KeepDecision, layers_only: Sequence[int] | None) -> None:
    """Keep sets for exactly the MoE layers; dry-run layers among them."""
    if sorted(decision.keep) != moe:
        raise PlanError(f"keep sets cover layers {sorted(decision.keep)}, but the MoE layers of {url} are {moe}")
    bad = sorted(set(layers_only or ()) - set(moe))
    if bad:
        raise PlanError(f"--layer {bad}: not MoE layers of {url} (MoE layers: 0..{max(moe)})")


def _output_shards(ckpt: Checkpoint, tensors: list[PlannedTensor], max_shard_bytes: int,
                   layers_only: Sequence[int] | None, patch: Mapping[str, Any]) -> tuple[OutputShard, ...]:
    """Tensors grouped into named output shards with their headers (one per layer for a dry run)."""
    container = container_of(ckpt)
    if layers_only is not None:
        groups = [[t for t in tensors if t.layer == layer] for layer in sorted(set(layers_only))]
        names = [f"layer-{layer:05d}{container.suffix}" for layer in sorted(set(layers_only))]
    else:
        groups = assign_shards(tensors, max_shard_bytes)
        names = container.output_names(ckpt, len(groups))
    headers = container.headers(ckpt, [[(t.name, t.dtype, t.shape) for t in grp] for grp in groups], patch)
    return tuple(OutputShard(name, header, tuple(grp)) for name, header, grp in zip(names, headers, groups))


#: A Hub repository id (``org/name``); any other ``_name_or_path`` names a folder of some machine.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def derived_config(source: Mapping[str, Any], layout: Layout, keep: Mapping[int, Sequence[int]], top_k: int,
                   soft: bool, renormalize: bool = False, tensor_names: Iterable[str] = (),
                   where: str = "config.json") -> tuple[dict[str, Any], dict[str, Any]]:
    """The output ``config.json`` and the patch that makes it from the source's: nothing else
    than what the keep sets, the top-k and ``--renormalize-topk`` imply.

    Counts are set to the largest kept count, and where layers keep different counts each
    layer's goes in :data:`PER_LAYER_FIELD`. A ``_name_or_path`` that is not a Hub id (a
    machine's folder) is emptied, since the output is made to be published. Module names of
    ``quantization_config`` that hold an expert number (``tensor_names`` are the source's) are
    dropped or renumbered with their experts (:mod:`planners.quantization`).
    """
    counts = {layer: len(ids) for layer, ids in sorted(keep.items())}
    patch = layout.config_patch(source, max(counts.values()), top_k)
    if soft:
        patch = {k: v for k, v in patch.items() if k in layout.topk_fields}
    elif len(set(counts.values())) > 1:
        patch[PER_LAYER_FIELD] = {str(layer): n for layer, n in counts.items()}
    if renormalize and layout.renormalize_field:
        patch[layout.renormalize_field] = True
    quant = None if soft else rewritten_quantization(source, layout, keep, tensor_names, where)
    if quant is not None:
        patch["quantization_config"] = quant
    name = source.get("_name_or_path")
    if isinstance(name, str) and name and not _HUB_ID.match(name):
        patch["_name_or_path"] = ""
    return {**source, **patch}, patch


_DIGEST_BUFFER = 1 << 20


def file_digest(storage: Any, name: str) -> dict[str, Any]:
    """``{"size", "sha256"}`` of one small file, read in bounded chunks."""
    size = storage.size(name)
    h = hashlib.sha256()
    for chunk in storage.iter_range(name, 0, size, bytearray(min(size, _DIGEST_BUFFER) or 1)):
        h.update(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def source_card(plan: Plan) -> str | None:
    """The name the source's model card gets in the output, when the source has one."""
    return base_card_name(plan.copy_files) if CARD_NAME in plan.copy_files else None


def copied_names(plan: Plan) -> dict[str, str]:
    """Each file the plan copies, and its name in the output (the source's card moves aside)."""
    card = source_card(plan)
    return {name: card if name == CARD_NAME and card else name for name in plan.copy_files}


def copied_file_problems(plan: Plan, storage: Any, names: Mapping[str, str]) -> list[str]:
    """Each copied file (``plan name -> name in storage``) whose bytes are not the ones the plan
    recorded; a missing file is one too."""
    problems = []
    for planned, name in names.items():
        want = plan.copy_digests[planned]
        if not storage.exists(name):
            problems.append(f"{storage.describe(name)} is missing")
            continue
        if storage.is_local and not os.path.isfile(storage.local_path(name)):
            problems.append(f"{storage.describe(name)} is not a regular file (a folder, a device or a pipe)")
            continue
        got = file_digest(storage, name)
        if got != dict(want):
            problems.append(f"{storage.describe(name)} is {got['size']:,} bytes with sha256 {got['sha256'][:12]}, "
                            f"not the {want['size']:,} bytes with sha256 {want['sha256'][:12]} the plan recorded")
    return problems


def check_copied_files(plan: Plan, storage: Any, where: str) -> None:
    """Refuse a source whose files to copy are not the bytes the plan hashed."""
    problems = copied_file_problems(plan, storage, {n: n for n in plan.copy_files})
    if problems:
        raise PlanError(f"{where}: {problems[0]}; a plan copies only the files it hashed (a tokenizer or "
                        f"generation config edited since planning changes the model): plan again")


def check_config(plan: Plan, ckpt: Checkpoint, where: str) -> None:
    """Refuse a plan whose ``config`` or ``config_patch`` is not what its source and keep sets
    imply: a plan's config would otherwise be written as it is (an ``auto_map`` runs code for
    anyone loading with ``trust_remote_code``; a wrong count or top-k breaks the model)."""
    field_name = ckpt.layout.renormalize_field
    renormalize = field_name is not None and plan.config_patch.get(field_name) is True
    config, patch = derived_config(ckpt.config, ckpt.layout, plan.keep, plan.top_k, plan.soft, renormalize,
                                   ckpt.tensors, ckpt.storage.describe(CONFIG_NAME))
    for what, planned, derived in (("config_patch", plan.config_patch, patch), ("config", plan.config, config)):
        if dict(planned) == derived:
            continue
        diff = sorted(k for k in planned.keys() | derived.keys() if planned.get(k, ...) != derived.get(k, ...))
        raise PlanError(f"{where}: plan field {what!r} differs from what {ckpt.url}'s config.json and the "
                        f"plan's expert_mapping and top_k imply, in {diff[:5]}; the output config is "
                        f"derived, never taken from a plan. Refusing this plan: make it again with "
                        f"`rewriter plan`")


def _other_files(files: Sequence[str]) -> tuple[list[str], list[str]]:
    """The source's non-tensor files to copy, and those left out (other layouts, hidden files,
    names that a Hugging Face repository could not hold)."""
    copy_files, skipped = [], []
    for f in files:
        if f.startswith(SKIPPED_DIRS) or hub_name_problem(f):
            skipped.append(f)
        elif f == CONFIG_NAME or f == INDEX_NAME or f.endswith(".safetensors"):
            continue
        else:
            copy_files.append(f)
    return copy_files, skipped


def _provenance(num_experts: int, top_k: int, decision: KeepDecision,
                extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a plan records of how it was made. No creation time: a plan is a function of its
    inputs, so the same command makes the same plan (and resumes an interrupted run of it) and
    its output is reproducible byte for byte."""
    return {
        "tool": "moe-rewriter",
        "source_experts_per_layer": num_experts,
        "source_top_k": top_k,
        "experts_per_layer": {str(k): len(v) for k, v in sorted(decision.keep.items())},
        **dict(extra or {}),
    }


def build_plan(
    ckpt: Checkpoint,
    decision: KeepDecision,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    layers_only: Sequence[int] | None = None,
    provenance: Mapping[str, Any] | None = None, soft: bool = False, renormalize: bool = False,
) -> Plan:
    """Turn keep sets into a plan for ``ckpt``.

    Args:
        ckpt: the opened source checkpoint (only headers were read).
        decision: kept experts per MoE layer and the routing top-k.
        max_shard_bytes: output shard size limit (tensor data), 5 GB by default as in HF.
        layers_only: only these layers' expert tensors, one file per layer (a dry-run plan).
        provenance: saliency digests, policy and parameters to record.
        soft: a soft prune: nothing is removed; dropped experts' router bias entries are set so
            they are never selected (and the top-k patched). Expert ids keep their numbers.
        renormalize: set the layout's ``renormalize_field``: kept top-k weights sum to 1.

    Raises:
        PlanError: keep sets that do not cover the MoE layers, or name unknown layers.
    """
    layout = ckpt.layout
    _check_layers(ckpt.url, sorted(layout.moe_layers(ckpt)), decision, layers_only)
    num_experts = layout.num_experts(ckpt.config)
    tensors = plan_tensors(ckpt, layout, decision.keep, layers_only, soft)
    uniform = len({len(v) for v in decision.keep.values()}) == 1
    _check_uniform_container(ckpt, uniform or soft)
    config, patch = derived_config(ckpt.config, layout, decision.keep, decision.top_k, soft, renormalize,
                                   ckpt.tensors, ckpt.storage.describe(CONFIG_NAME))
    outputs = _output_shards(ckpt, tensors, max_shard_bytes, layers_only, patch)
    copy_files, skipped = _other_files(ckpt.files)
    if not soft:
        check_side_files(ckpt, copy_files, layout, decision.keep)
    prov = _provenance(num_experts, layout.top_k(ckpt.config), decision, provenance)
    return Plan(
        source_url=source_location(ckpt.storage),
        source_shards=ckpt.fingerprint(),
        family=layout.family,
        outputs=outputs,
        config=config,
        config_patch=patch,
        keep={k: tuple(v) for k, v in decision.keep.items()},
        top_k=decision.top_k,
        copy_files=tuple(copy_files),
        skipped_files=tuple(skipped),
        copy_digests={name: file_digest(ckpt.storage, name) for name in copy_files},
        reasons=decision.reasons,
        provenance=prov,
        loadable=uniform or soft,
        layers_only=tuple(sorted(set(layers_only))) if layers_only is not None else None,
        soft=soft,
        container=ckpt.container,
    )
