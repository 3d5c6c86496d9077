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
from typing import Any

from core.errors import PlanError
from planners.carried_field import (
    CARRIED_PLAN_VERSION,
    INLINE_LIMIT,
    Carried,
    carried_nbytes,
    carried_segment,
    carried_tensors,
    check_not_expert,
)
from planners.plan import Plan
from planners.tensors import OutputShard, PlannedTensor

__all__ = ["CARRIED_PLAN_VERSION", "INLINE_LIMIT", "Carried", "carried_bytes", "carried_nbytes", "carried_tensors",
           "carry_tensors", "require_carried_bytes"]


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
    check_not_expert(plan, t, "")
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
