"""A plan read from a file against its source: the shards it was made from, the tensors its expert mapping takes, the config it writes and the files it copies."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from core.checkpoint import (
    CONFIG_NAME,
    Checkpoint,
)
from core.errors import PlanError
from core.layouts import PER_LAYER_FIELD, Layout
from planners.carried import carried_tensors
from planners.plan import CARD_NAME, Plan, source_card
from planners.provenance import source_location
from planners.quantization import rewritten_quantization
from planners.tensors import plan_tensors


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
    for t in carried_tensors(plan):  # its bytes are new; the rest of it is what the source implies
        if t.name in expected:
            planned[t.name] = dataclasses.replace(t, segments=expected[t.name].segments)
    for name in sorted(expected.keys() | planned.keys()):
        if expected.get(name) != planned.get(name):
            found = "is missing" if name not in planned else (
                "is not among the tensors it implies" if name not in expected else "takes other bytes")
            raise PlanError(f"{where}: expert_mapping does not match its tensors: tensor {name!r} "
                            f"{found} (mode {'soft' if plan.soft else 'structural'}). {what}")


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


def check_source(plan: Plan, ckpt: Checkpoint) -> None:
    """Refuse a source whose shards differ from the ones ``plan`` was made from, and a plan read
    from a file whose tensors, config or files to copy are not the ones its expert mapping takes
    from that source (a plan built here by :func:`planners.build.build_plan` is consistent by
    construction).

    When ``ckpt`` is not at the plan's source URL, the message says that the source given
    differs from the plan's (naming both) rather than that the source changed.
    """
    _check_shards(plan, ckpt)
    if plan.origin is not None:
        check_mapping(plan, ckpt, plan.origin)
        check_config(plan, ckpt, plan.origin)
        check_copied_files(plan, ckpt.storage, plan.origin)


def _check_shards(plan: Plan, ckpt: Checkpoint) -> None:
    now = ckpt.fingerprint()
    elsewhere = source_location(ckpt.storage) != plan.source_url
    for name, fp in plan.source_shards.items():
        found = now.get(name)
        if found is not None and dict(found) == dict(fp):
            continue
        if elsewhere:
            what = "has no shard" if found is None else "has a different shard"
            raise PlanError(
                f"the source given, {ckpt.url}, is not the one the plan was made from, "
                f"{plan.source_url}: it {what} '{name}'; pass the plan's source (or plan "
                f"again from {ckpt.url})"
            )
        if found is None:
            raise PlanError(f"{ckpt.url}: shard '{name}' of the plan's source is missing; plan again")
        raise PlanError(
            f"{ckpt.storage.describe(name)} changed since the plan was made (planned "
            f"size {fp['size']:,}, header {fp['header_sha256'][:12]}; found size "
            f"{found['size']:,}, header {found['header_sha256'][:12]}); plan again"
        )
