"""The plan's "carried" field: what a plan records of the tensors whose bytes it carries (see
:mod:`planners.carried`), its JSON form and its checks. :mod:`planners.plan` reads and writes it
through this module, which therefore knows a plan only by the few attributes it uses."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from core.errors import PlanError
from core.layouts import LAYOUTS
from planners.tensors import OutputShard, PlannedTensor, Segment

#: The plan version of a plan that carries tensors; plans without carried tensors stay version 2.
CARRIED_PLAN_VERSION = 3
#: Up to this many carried bytes in all, a plan file holds them inline (hex); above, a sidecar.
INLINE_LIMIT = 64 * 1024


class PlanLike(Protocol):
    """What these functions read of a :class:`planners.plan.Plan`."""

    @property
    def outputs(self) -> Sequence[OutputShard]: ...
    @property
    def carried(self) -> Carried | None: ...
    @property
    def family(self) -> str: ...
    @property
    def origin(self) -> str | None: ...


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


def carried_segment(data: bytes, sha256: str) -> Segment:
    return Segment("", 0, len(data), data, sha256)


def carried_tensors(plan: PlanLike) -> list[PlannedTensor]:
    """The plan's carried tensors, in output order."""
    return [t for o in plan.outputs for t in o.tensors if t.segments and t.segments[0].sha256 is not None]


def carried_nbytes(plan: PlanLike) -> int:
    return sum(t.nbytes for t in carried_tensors(plan))


# --- JSON: the plan's "carried" field -------------------------------------------------------------

#: Keys of the "carried" field that say where the bytes are, not what they are: left out of the
#: plan's identity and of ``pruning.json`` (which records the sha256 only).
STORAGE_KEYS = ("inline", "sidecar")
_SHA_HEX = frozenset("0123456789abcdef")


def carried_json(plan: PlanLike) -> dict[str, Any]:
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
    if type(found) is not int:  # true == 1 and 3.0 == 3 in Python; a plan writes the integer
        found = json.dumps(found)
    shown = str(found) if len(str(found)) <= 40 else str(found)[:37] + "..."
    if found == 1:
        raise PlanError(f"{where}: plan version 1 was made by an earlier rewriter, which recorded neither "
                        f"the copied files' sha256 nor a config derived from the source; make the plan "
                        f"again with `rewriter plan` (this tool reads versions {version} and {CARRIED_PLAN_VERSION})")
    if found not in (version, CARRIED_PLAN_VERSION):
        newer = isinstance(found, int) and found > CARRIED_PLAN_VERSION
        raise PlanError(f"{where}: plan version {shown}; this tool reads versions {version} and "
                        f"{CARRIED_PLAN_VERSION} " + ("(a newer rewriter made it: upgrade moe-rewriter)" if newer
                                                      else "(an integer): make the plan again with `rewriter plan`"))
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
                               and not set(c["sidecar"]) & {"/", "\\", "\x00"}
                               and not c["sidecar"].startswith(".")):
        raise fail("sidecar", "the file name of a .safetensors file beside the plan")
    return Carried(c["method"], tensors)


def check_carried(plan: PlanLike, where: str) -> None:
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
        check_not_expert(plan, t, where)


def check_not_expert(plan: PlanLike, t: PlannedTensor, where: str) -> None:
    layout = next(layout for layout in LAYOUTS if layout.family == plan.family)
    role = layout.classify(t.source)
    if role is not None and role.role in ("expert", "fused"):
        raise PlanError(f"{where + ': ' if where else ''}cannot carry {t.name!r}: it is an expert's tensor, and experts' bytes "
                        f"are always copied from the source; only other tensors (routers, their biases) "
                        f"may be carried")
