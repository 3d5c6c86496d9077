"""Building a plan: the output tensors of a keep decision, their shards and names, the derived config and the files copied."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from core.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint
from core.errors import PlanError
from core.format import encode_header
from core.names import hub_name_problem
from planners.plan import DEFAULT_MAX_SHARD_BYTES, SKIPPED_DIRS, Plan
from planners.policies import KeepDecision
from planners.provenance import source_location
from planners.source_check import derived_config, file_digest
from planners.tensors import OutputShard, PlannedTensor, plan_tensors


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


def shard_names(n: int, zero_based: bool, prefix: str = "model") -> list[str]:
    """Output shard names as transformers' ``save_pretrained`` writes them: one shard is
    ``model.safetensors`` (the name loaders look for first; the index, written last to mark the
    output complete, names it too), several are numbered from 1, or from 0 like the source's."""
    if n == 1:
        return [f"{prefix}.safetensors"]
    if zero_based:
        return [f"{prefix}-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
    return [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _check_layers(url: str, moe: list[int], decision: KeepDecision, layers_only: Sequence[int] | None) -> None:
    """Keep sets for exactly the MoE layers; dry-run layers among them."""
    if sorted(decision.keep) != moe:
        raise PlanError(f"keep sets cover layers {sorted(decision.keep)}, but the MoE layers of {url} are {moe}")
    bad = sorted(set(layers_only or ()) - set(moe))
    if bad:
        raise PlanError(f"--layer {bad}: not MoE layers of {url} (MoE layers: 0..{max(moe)})")


def _output_shards(ckpt: Checkpoint, tensors: list[PlannedTensor], max_shard_bytes: int,
                   layers_only: Sequence[int] | None) -> tuple[OutputShard, ...]:
    """Tensors grouped into named output shards with their headers (one per layer for a dry run)."""
    if layers_only is not None:
        groups = [[t for t in tensors if t.layer == layer] for layer in sorted(set(layers_only))]
        names = [f"layer-{layer:05d}.safetensors" for layer in sorted(set(layers_only))]
    else:
        groups = assign_shards(tensors, max_shard_bytes)
        zero_based = any(re.search(r"-00000-of-\d+\.safetensors$", s) for s in ckpt.shards)
        names = shard_names(len(groups), zero_based)
    return tuple(
        OutputShard(name, encode_header([(t.name, t.dtype, t.shape) for t in grp], {"format": "pt"}), tuple(grp))
        for name, grp in zip(names, groups)
    )


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
        layers_only: restrict the plan to these layers' expert tensors, one output file per
            layer (``layer-00018.safetensors``): a per-layer dry-run plan.
        provenance: saliency digests, policy and parameters to record.
        soft: a soft prune: nothing is removed; dropped experts' router bias entries are set so
            they are never selected (and the top-k patched). Expert ids keep their numbers.
        renormalize: set the family's layout's ``renormalize_field`` (``norm_topk_prob``), so the
            kept top-k routing weights sum to 1.

    Raises:
        PlanError: keep sets that do not cover the MoE layers, or name unknown layers.
    """
    layout = ckpt.layout
    _check_layers(ckpt.url, sorted(layout.moe_layers(ckpt)), decision, layers_only)
    num_experts = layout.num_experts(ckpt.config)
    tensors = plan_tensors(ckpt, layout, decision.keep, layers_only, soft)
    outputs = _output_shards(ckpt, tensors, max_shard_bytes, layers_only)
    uniform = len({len(v) for v in decision.keep.values()}) == 1
    config, patch = derived_config(ckpt.config, layout, decision.keep, decision.top_k, soft, renormalize)
    copy_files, skipped = _other_files(ckpt.files)
    # No creation time: a plan is a function of its inputs, so the same command makes the same
    # plan (and resumes an interrupted run of it) and its output is reproducible byte for byte.
    prov = {
        "tool": "moe-rewriter",
        "source_experts_per_layer": num_experts,
        "source_top_k": layout.top_k(ckpt.config),
        "experts_per_layer": {str(k): len(v) for k, v in sorted(decision.keep.items())},
        **dict(provenance or {}),
    }
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
    )
