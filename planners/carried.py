"""Plans that carry new bytes: output tensors whose bytes are not read from the source.

A pruned model's routers can be refitted to the kept experts (router recalibration); the new
router tensors travel with the plan, named by sha256, and every executor writes them as it
writes a soft prune's literal bytes. Nothing else in the plan changes: the experts' tensors are
still copied byte for byte from the source.

In a plan file the bytes are inline (hex) when small, else in a sidecar safetensors file beside
the plan (:mod:`planners.carried_file`); ``pruning.json`` records only their sha256, which is all
``verify`` needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import PlanError
from core.layouts import LAYOUTS
from planners.tensors import OutputShard, PlannedTensor, Segment

if TYPE_CHECKING:
    from planners.plan import Plan

#: The plan version of a plan that carries tensors; plans without carried tensors stay version 2.
CARRIED_PLAN_VERSION = 3
#: Up to this many carried bytes in all, a plan file holds them inline (hex); above, a sidecar.
INLINE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Carried:
    """What a plan records of its carried tensors: how they were made (``method``, JSON) and
    each one's sha256 by output tensor name, in the plan's output order."""

    method: Mapping[str, Any]
    tensors: Mapping[str, str]

    @property
    def sidecar_name(self) -> str:
        """The sidecar's file name, from its content: two plans carrying the same bytes share it."""
        table = json.dumps(dict(self.tensors), sort_keys=True, separators=(",", ":")).encode()
        return f"carried-{hashlib.sha256(table).hexdigest()[:16]}.safetensors"


def carry_tensors(plan: Plan, new: Mapping[str, bytes], *, method: Mapping[str, Any]) -> Plan:
    """The same plan with the output tensors named in ``new`` made of those bytes.

    Args:
        plan: a plan without carried tensors.
        new: output tensor name -> its complete new bytes (little-endian, the planned tensor's
            dtype and shape: exactly its ``nbytes``). Only tensors that are not experts' tensors
            (routers, their biases) may be carried.
        method: how the bytes were made, JSON-able (recorded in the plan, ``pruning.json`` and
            the model card), e.g. ``{"kind": "router-recalibration", "tokens": 1000000, ...}``.

    Returns:
        A plan (version 3) whose digest differs from ``plan``'s; with ``new`` empty, ``plan``.

    Raises:
        PlanError: a name that is not an output tensor or is an expert's tensor, bytes of the
            wrong length, a ``method`` that is not a JSON object, or a plan that already carries.

    Example:
        >>> plan = carry_tensors(plan, {"model.layers.0.mlp.router.weight": rows}, method={"kind": "x"})
    """
    if not new:
        return plan
    if plan.carried is not None:
        raise PlanError("the plan already carries tensors; carry all new tensors in one call")
    _check_method(method)
    planned = {t.name: t for o in plan.outputs for t in o.tensors}
    for name, data in new.items():
        _check_new(plan, planned.get(name), name, data)
    outputs = tuple(_carry_output(o, new) for o in plan.outputs)
    order = [t.name for o in plan.outputs for t in o.tensors if t.name in new]
    carried = Carried(json.loads(json.dumps(method)), {n: hashlib.sha256(new[n]).hexdigest() for n in order})
    return dataclasses.replace(plan, outputs=outputs, carried=carried, version=CARRIED_PLAN_VERSION)


def _check_method(method: Mapping[str, Any]) -> None:
    try:
        ok = isinstance(method, Mapping) and bool(json.dumps(method, allow_nan=False))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PlanError(f"carried tensors' method {method!r:.80} must be a JSON object (it is recorded "
                        f"in the plan, pruning.json and the model card)")


def _check_new(plan: Plan, t: PlannedTensor | None, name: str, data: Any) -> None:
    if t is None:
        raise PlanError(f"cannot carry {name!r}: it is not an output tensor of the plan (carried tensors "
                        f"are named as in the pruned output, e.g. model.layers.0.mlp.router.weight)")
    _check_not_expert(plan, t, "")
    if not isinstance(data, bytes):
        raise PlanError(f"cannot carry {name!r}: its new bytes are a {type(data).__name__}; expected bytes")
    if len(data) != t.nbytes:
        raise PlanError(f"cannot carry {name!r}: {len(data):,} new bytes, but the planned {t.dtype}"
                        f"{list(t.shape)} tensor is {t.nbytes:,} bytes; pass exactly its bytes (little-endian)")


def _carry_output(o: OutputShard, new: Mapping[str, bytes]) -> OutputShard:
    if not any(t.name in new for t in o.tensors):
        return o
    tensors = tuple(
        dataclasses.replace(t, segments=(carried_segment(new[t.name], hashlib.sha256(new[t.name]).hexdigest()),))
        if t.name in new else t
        for t in o.tensors
    )
    return dataclasses.replace(o, tensors=tensors)


def carried_segment(data: bytes, sha256: str) -> Segment:
    return Segment("", 0, len(data), data, sha256)


def carried_tensors(plan: Plan) -> list[PlannedTensor]:
    """The plan's carried tensors, in output order."""
    return [t for o in plan.outputs for t in o.tensors if t.segments and t.segments[0].sha256 is not None]


def carried_bytes(plan: Plan, name: str) -> bytes:
    """The carried bytes of output tensor ``name`` (a plan loaded with its bytes)."""
    for t in carried_tensors(plan):
        if t.name == name:
            data = t.segments[0].data
            if data is None:
                raise PlanError(f"{plan.origin or 'the plan'}: the bytes of carried tensor {name!r} were not "
                                f"loaded (a plan read from pruning.json records only their sha256)")
            return data
    raise PlanError(f"{plan.origin or 'the plan'}: {name!r} is not a carried tensor of the plan")


def require_carried_bytes(plan: Plan) -> None:
    """Refuse to write a plan whose carried bytes were not loaded (one read from ``pruning.json``)."""
    missing = [t.name for t in carried_tensors(plan) if t.segments[0].data is None]
    if missing:
        raise PlanError(f"{plan.origin or 'the plan'}: the bytes of carried tensor {missing[0]!r} were not "
                        f"loaded (a plan read from pruning.json records only their sha256); run the plan "
                        f"file that carries them (read with Plan.load)")


def carried_nbytes(plan: Plan) -> int:
    return sum(t.nbytes for t in carried_tensors(plan))


# --- JSON: the plan's "carried" field -------------------------------------------------------------

#: Keys of the "carried" field that say where the bytes are, not what they are: left out of the
#: plan's identity and of ``pruning.json`` (which records the sha256 only).
STORAGE_KEYS = ("inline", "sidecar")
_SHA_HEX = frozenset("0123456789abcdef")


def carried_json(plan: Plan) -> dict[str, Any]:
    """The plan's "carried" field: method, sha256 by name, and where the bytes are: inline hex
    up to :data:`INLINE_LIMIT` bytes in all, else the sidecar's name. A plan whose bytes were not
    loaded (read from ``pruning.json``) records neither."""
    assert plan.carried is not None
    doc: dict[str, Any] = {"method": dict(plan.carried.method), "tensors": dict(plan.carried.tensors)}
    tensors = carried_tensors(plan)
    if any(t.segments[0].data is None for t in tensors):
        return doc
    if carried_nbytes(plan) <= INLINE_LIMIT:
        doc["inline"] = {t.name: t.segments[0].data.hex() for t in tensors if t.segments[0].data is not None}
    else:
        doc["sidecar"] = plan.carried.sidecar_name
    return doc


def without_storage(doc: dict[str, Any]) -> dict[str, Any]:
    """A plan document whose "carried" field names no bytes' storage (identity, ``pruning.json``)."""
    if "carried" in doc:
        doc["carried"] = {k: v for k, v in doc["carried"].items() if k not in STORAGE_KEYS}
    return doc


def check_version(doc: Mapping[str, Any], where: str, version: int) -> None:
    """Plans of ``version`` (2) without carried tensors, and of version 3 with them."""
    found = doc.get("version")
    if found == 1:
        raise PlanError(f"{where}: plan version 1 was made by an earlier rewriter, which recorded neither "
                        f"the copied files' sha256 nor a config derived from the source; make the plan "
                        f"again with `rewriter plan` (this tool reads versions {version} and {CARRIED_PLAN_VERSION})")
    if found not in (version, CARRIED_PLAN_VERSION):
        raise PlanError(f"{where}: plan version {found!r}; this tool reads versions {version} and "
                        f"{CARRIED_PLAN_VERSION} (a newer rewriter made it: upgrade moe-rewriter)")
    if (found == CARRIED_PLAN_VERSION) != ("carried" in doc):
        raise PlanError(f"{where}: a plan of version {found} must {'' if found == CARRIED_PLAN_VERSION else 'not '}"
                        f"have a 'carried' field (version {CARRIED_PLAN_VERSION} is a plan that carries "
                        f"tensors). Refusing this plan: make it again")


def carried_from_json(doc: Mapping[str, Any], where: str) -> Carried | None:
    """The "carried" field, its types checked (untrusted, as the whole plan is)."""
    if "carried" not in doc:
        return None
    c = doc["carried"]

    def fail(field: str, expected: str) -> PlanError:
        return PlanError(f"{where}: plan field 'carried.{field}' is malformed; expected {expected}. "
                         f"Refusing this plan: make it again (or restore the field)")

    if not isinstance(c, dict) or not set(c) <= {"method", "tensors", *STORAGE_KEYS}:
        raise fail("*", 'an object with "method", "tensors" and at most one of "inline" or "sidecar"')
    if not isinstance(c.get("method"), dict):
        raise fail("method", "a JSON object saying how the carried bytes were made")
    tensors = c.get("tensors")
    if (not isinstance(tensors, dict) or not tensors
            or not all(isinstance(v, str) and len(v) == 64 and set(v) <= _SHA_HEX for v in tensors.values())):
        raise fail("tensors", "a non-empty object of output tensor name -> sha256 (64 lowercase hex digits)")
    if "inline" in c and "sidecar" in c:
        raise fail("*", 'one of "inline" or "sidecar", not both')
    inline = c.get("inline", {})
    if not isinstance(inline, dict) or ("inline" in c and sorted(inline) != sorted(tensors)) or not all(
            isinstance(v, str) for v in inline.values()):
        raise fail("inline", "an object of each carried tensor's name -> its bytes as hex")
    if "sidecar" in c and not (isinstance(c["sidecar"], str) and c["sidecar"].endswith(".safetensors")
                               and "/" not in c["sidecar"] and not c["sidecar"].startswith(".")):
        raise fail("sidecar", "the file name of a .safetensors file beside the plan")
    return Carried(c["method"], tensors)


def check_carried(plan: Plan, where: str) -> None:
    """The carried table and the outputs agree: each carried tensor is one segment of the
    recorded sha256, no other segment claims to be carried, and no expert's tensor is carried."""
    recorded = dict(plan.carried.tensors) if plan.carried is not None else {}
    found = {}
    for o in plan.outputs:
        for t in o.tensors:
            if any(s.sha256 is not None for s in t.segments):
                if len(t.segments) != 1:
                    raise PlanError(f"{where}: output tensor {t.name!r}: a carried tensor is one segment "
                                    f"of carried bytes. Refusing this plan: make it again")
                found[t.name] = t
    outputs = {t.name for o in plan.outputs for t in o.tensors}
    for name in sorted(set(found) ^ set(recorded)):
        problem = ("has carried bytes but is not listed in 'carried.tensors'" if name in found else
                   "is listed in 'carried.tensors' but its segments are not carried bytes" if name in outputs else
                   "is listed in 'carried.tensors' but is not an output tensor of the plan")
        raise PlanError(f"{where}: tensor {name!r} {problem}. Refusing this plan: make it again")
    for name, t in found.items():
        if t.segments[0].sha256 != recorded[name]:
            raise PlanError(f"{where}: carried tensor {name!r}: its segment's sha256 is not the one "
                            f"'carried.tensors' records. Refusing this plan: make it again")
        _check_not_expert(plan, t, where)


def _check_not_expert(plan: Plan, t: PlannedTensor, where: str) -> None:
    layout = next(layout for layout in LAYOUTS if layout.family == plan.family)
    role = layout.classify(t.source)
    if role is not None and role.role in ("expert", "fused"):
        raise PlanError(f"{where + ': ' if where else ''}cannot carry {t.name!r}: it is an expert's tensor, and experts' bytes "
                        f"are always copied from the source; only other tensors (routers, their biases) "
                        f"may be carried")
