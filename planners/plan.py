"""The plan: everything a rewrite does, decided from headers, index, config and keep sets.

A plan is data (versioned JSON). Local runs, Ray runs, dry runs, cost estimates and ``verify``
all read the same plan. Building one reads no tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from core.atomic import write_whole
from core.checkpoint import CONFIG_NAME
from core.containers import CONTAINERS
from core.errors import PlanError
from core.jsonfile import parse_json, read_url
from core.memo import collector_paused
from planners import carried_field as carry
from planners import plan_schema
from planners.carried_file import load_carried, save_carried
from planners.plan_check import check_plan
from planners.plan_schema import check_document
from planners.provenance import (  # noqa: F401 (PROVENANCE_NAME: also this module's name for it)
    LOCAL_SOURCE,
    PROVENANCE_NAME,
    UNSTABLE_PROVENANCE,
    is_local_path,
    names_only,
    published_source,
    without_paths,
)
from planners.tensors import OutputShard, PlannedTensor, output_from_json

PLAN_FORMAT = "moe-rewriter-plan"
#: 2: ``copy_file_digests`` (each copied file's size and sha256) and a derived config.
PLAN_VERSION = 2
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
#: Folders of the gpt-oss Hub repos holding other layouts of the same weights; a pruned
#: checkpoint must not carry them, since they would no longer match.
SKIPPED_DIRS = ("original/", "metal/")
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
    #: The file format of source and output (:data:`core.containers.CONTAINERS`).
    container: str = "safetensors"
    version: int = PLAN_VERSION
    #: Output tensors whose bytes the plan carries (:mod:`planners.carried`); ``None``: none.
    carried: carry.Carried | None = None
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
        return self._doc(self._outputs_json)

    def _doc(self, outputs: Any) -> dict[str, Any]:
        """The plan document with ``outputs`` as its outputs' field (their JSON, or a stand-in
        where the outputs are written as text made apart)."""
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
            "outputs": outputs,
            "provenance": dict(self.provenance),
            **({"carried": carry.carried_json(self)} if self.carried is not None else {}),
        }

    @cached_property
    def _outputs_json(self) -> list[dict[str, Any]]:
        """The outputs as JSON, made once."""
        return [self._output_json(o) for o in self.outputs]

    def _output_json(self, o: OutputShard) -> dict[str, Any]:
        return {"name": o.name, "size": o.size, "header": CONTAINERS[self.container].header_to_json(o.header),
                "tensors": [_tensor_json(t) for t in o.tensors]}

    @property
    def source_recorded(self) -> bool:
        """Whether the plan says where its source is (not a local one recorded by content only)."""
        return not self.source_url.startswith(LOCAL_SOURCE)

    def published_json(self) -> dict[str, Any]:
        """The plan as ``pruning.json`` publishes it: no path of this machine. A local source is
        named by its folder (its shards' fingerprints and copied files' sha256 identify it), and
        saliency files and keep lists by file name (their sha256 stays). Same digest."""
        doc = carry.without_storage(self.to_json())
        if is_local_path(self.source_url):
            doc["source"]["url"] = published_source(self.source_url)
        prov = doc["provenance"]
        for key in ("saliency", "keep_list"):
            if key in prov:
                prov[key] = names_only(prov[key])
        return doc

    def identity_json(self) -> dict[str, Any]:
        """The plan without what depends on when and where it was made: the provenance's
        creation time (older plans carry one), the paths its saliency files or keep list were
        read from (their sha256 stays) and where its source is (its fingerprints stay)."""
        return self._identity(self.to_json())

    def _identity(self, doc: dict[str, Any]) -> dict[str, Any]:
        doc = carry.without_storage(doc)
        doc["source"] = {k: v for k, v in doc["source"].items() if k != "url"}
        prov = {k: v for k, v in doc["provenance"].items() if k not in UNSTABLE_PROVENANCE}
        for key in ("saliency", "keep_list"):
            if key in prov:
                prov[key] = without_paths(prov[key])
        doc["provenance"] = prov
        return doc

    @cached_property
    def _outputs_text(self) -> list[str]:
        """Each output as canonical JSON (sorted keys, compact), made once: the plan file and the
        digest both hold them, the bulk of a 1 T plan. Each output's JSON objects are made and
        dropped in turn (a 1 T plan's would hold 70 MB)."""
        return [json.dumps(self._output_json(o), sort_keys=True, separators=(",", ":"), check_circular=False)
                for o in self.outputs]

    def canonical_bytes(self) -> bytes:
        """``json.dumps(identity_json(), sort_keys=True, separators=(",", ":"))``."""
        return "".join(self._canonical_pieces()).encode()

    def _canonical_pieces(self) -> Iterator[str]:
        """:meth:`canonical_bytes` in pieces, the outputs' canonical JSON as made once
        (:attr:`_outputs_text`)."""
        mark = f"outputs {uuid.uuid4().hex}"  # a string no field of a plan holds
        text = json.dumps(self._identity(self._doc(mark)), sort_keys=True, separators=(",", ":"))
        head, found, tail = text.partition(json.dumps(mark))
        assert found and json.dumps(mark) not in tail
        yield head + "["
        for i, o in enumerate(self._outputs_text):
            yield ("," if i else "") + o
        yield "]" + tail

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical JSON of :meth:`identity_json`: the plan's identity in
        journals and provenance. Two plans of the same inputs have the same digest."""
        with collector_paused():
            h = hashlib.sha256()
            for piece in self._canonical_pieces():  # 27 MB for a 1 T plan: not held twice
                h.update(piece.encode())
            return h.hexdigest()

    def save(self, url: str) -> None:
        """Write the plan as JSON to ``url``, and its carried bytes' sidecar beside it first; each
        appears whole or not at all (:func:`core.atomic.write_whole`)."""
        save_carried(self, url)
        with collector_paused():
            write_whole(url, lambda f: f.writelines(plan_schema.plan_chunks(self._doc(None), self._outputs_text)),
                        binary=False)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = "plan") -> Plan:
        """Rebuild a plan, checking format, version and that every header matches its tensors."""
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise PlanError(f"{where}: not a plan (expected \"format\": \"{PLAN_FORMAT}\")")
        carry.check_version(doc, where, PLAN_VERSION)
        check_document(doc, where)
        container = doc.get("container", "safetensors")
        if container not in CONTAINERS:
            raise PlanError(f"{where}: plan field 'container' is {container!r}; expected one of "
                            f"{sorted(CONTAINERS)}. Refusing this plan: make it again with `rewriter plan`")
        try:
            outputs = tuple(output_from_json(o, where, CONTAINERS[container]) for o in doc["outputs"])
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
                version=doc["version"],
                carried=carry.carried_from_json(doc, where),
                origin=where,
            )
            check_plan(plan, where)
            carry.check_carried(plan, where)
            return plan
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{where}: malformed plan ({type(e).__name__}: {e}); make the plan again "
                            f"with `rewriter plan`") from None

    @classmethod
    def load(cls, url: str) -> Plan:
        """Read a plan file, with its carried bytes (inline or from its sidecar, sha256 checked)."""
        with collector_paused():
            doc = parse_json(read_url(url, PlanError, missing="plan file not found"), url, PlanError)
            return load_carried(cls.from_json(doc, url), doc, url)


def _tensor_json(t: PlannedTensor) -> dict[str, Any]:
    doc = {"name": t.name, "source": t.source, "layer": t.layer, "dtype": t.dtype, "shape": list(t.shape),
           "segments": [[s.shard, s.offset, s.length] if s.data is None and s.sha256 is None else s.to_json()
                        for s in t.segments]}
    if t.pad:
        doc["pad"] = t.pad
    return doc


def require_source(plan: Plan, what: str) -> str:
    """The plan's source URL, or a clear error when it records a local source by content only."""
    if plan.source_recorded:
        return plan.source_url
    raise PlanError(f"{plan.origin or 'the plan'} records its source as {plan.source_url!r}: a local folder, "
                    f"identified by content only (pruning.json publishes no path of the machine that made it); "
                    f"{what}")


def source_card(plan: Plan) -> str | None:
    """The name the source's model card gets in the output, when the source has one."""
    return base_card_name(plan.copy_files) if CARD_NAME in plan.copy_files else None

