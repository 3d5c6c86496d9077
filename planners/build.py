"""Building a plan: the output tensors of a keep decision, their shards and names, the derived config and the files copied."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from core.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint
from core.containers import container_of
from core.errors import PlanError
from core.names import hub_name_problem
from planners.plan import DEFAULT_MAX_SHARD_BYTES, SKIPPED_DIRS, Plan
from planners.policies import KeepDecision
from planners.provenance import source_location
from planners.quantization import check_side_files
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


def _provenance(ckpt: Checkpoint, decision: KeepDecision, given: Mapping[str, Any] | None) -> dict[str, Any]:
    # No creation time: a plan is a function of its inputs, so the same command makes the same
    # plan (and resumes an interrupted run of it) and its output is reproducible byte for byte.
    return {
        "tool": "moe-rewriter",
        "source_experts_per_layer": ckpt.layout.num_experts(ckpt.config),
        "source_top_k": ckpt.layout.top_k(ckpt.config),
        "experts_per_layer": {str(k): len(v) for k, v in sorted(decision.keep.items())},
        **dict(given or {}),
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
    tensors = plan_tensors(ckpt, layout, decision.keep, layers_only, soft)
    uniform = len({len(v) for v in decision.keep.values()}) == 1
    _check_uniform_container(ckpt, uniform or soft)
    config, patch = derived_config(ckpt.config, layout, decision.keep, decision.top_k, soft, renormalize,
                                   ckpt.tensors, ckpt.storage.describe(CONFIG_NAME))
    outputs = _output_shards(ckpt, tensors, max_shard_bytes, layers_only, patch)
    copy_files, skipped = _other_files(ckpt.files)
    if not soft:
        check_side_files(ckpt, copy_files, layout, decision.keep)
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
        provenance=_provenance(ckpt, decision, provenance),
        loadable=uniform or soft,
        layers_only=tuple(sorted(set(layers_only))) if layers_only is not None else None,
        soft=soft,
        container=ckpt.container,
    )
