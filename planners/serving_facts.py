"""What the serving rules read: a checkpoint's or a plan's facts (family, expert and top-k counts, the config fields an engine reads)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.checkpoint import Checkpoint
from core.layouts import Layout
from planners.plan import Plan
from planners.quantization import module_list_problem

#: Expert-count and top-k fields any engine may read, in the order llama.cpp's converter
#: (``convert_hf_to_gguf.py``, ``TextModel.set_gguf_parameters``) looks for them.
COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


TOPK_FIELDS = ("num_experts_per_tok", "experts_per_token")


@dataclass(frozen=True)
class ServingFacts:
    """What the rules look at, from ``config.json`` and the tensor headers only.

    Attributes:
        family: the layout's family (``gpt_oss``, ``qwen3_moe``, …).
        layer_counts: experts per MoE layer, as the tensors hold them.
        count_fields / topk_fields: the family's count / top-k fields and those of
            :data:`COUNT_FIELDS` / :data:`TOPK_FIELDS` present in the config, with their values.
        group_field: the family's config field of group-limited routing (``None``: the family
            routes without groups, whatever its config says).
        n_group / topk_group: group-limited routing (DeepSeek-V3, GLM-4.5) as the config holds
            them (``None`` when absent; any other value is judged by the ``n-group`` rule).
        quant_method: ``quantization_config.quant_method`` of the config, if any.
        quant_problem: what is wrong with a ``quantization_config`` that is not an object with a
            string ``quant_method`` (``None`` when absent or well-formed).
        expert_dtypes: dtypes of the expert tensors (``U8`` blocks for MXFP4, ``F8_E4M3`` …).
        mxfp4_blocks: whether the expert weights are MXFP4 ``*_blocks``/``*_scales`` tensors.
        quant_modules_problem: what disagrees between ``quantization_config``'s module lists
            and the per-expert tensors (:func:`planners.quantization.module_list_problem`).
        config_name: what messages call the config (``config.json``, or ``the GGUF metadata``).
    """

    family: str
    layer_counts: Mapping[int, int]
    count_fields: Mapping[str, Any]
    topk_fields: Mapping[str, Any]
    n_group: Any = None
    topk_group: Any = None
    quant_method: str | None = None
    quant_problem: str | None = None
    group_field: str | None = "n_group"
    expert_dtypes: frozenset[str] = frozenset()
    mxfp4_blocks: bool = False
    quant_modules_problem: str | None = None
    #: Where the fields are read: ``config.json``, or a GGUF model's metadata.
    config_name: str = "config.json"

    @property
    def counts(self) -> set[int]:
        return set(self.layer_counts.values())

    @property
    def count(self) -> int:
        """The per-layer expert count (the largest, when layers differ)."""
        return max(self.counts) if self.counts else 0

    @property
    def fewest(self) -> int:
        """The smallest per-layer expert count: the one the routing top-k must fit."""
        return min(self.counts) if self.counts else 0

    def count_text(self) -> str:
        """``32``, or ``15-19`` where layers differ."""
        return str(self.count) if len(self.counts) <= 1 else f"{self.fewest}-{self.count}"

    @property
    def top_k(self) -> int | None:
        """The routing top-k: the first positive integer field, or the largest entry of a per-layer
        list (Hunyuan's ``moe_topk``)."""
        ints = [v if is_int(v) else max(v) for v in self.topk_fields.values()
                if (is_int(v) and v > 0) or (isinstance(v, list) and v and all(is_int(x) and x > 0 for x in v))]
        return ints[0] if ints else None

    def with_count(self, n: int) -> ServingFacts:
        """The same checkpoint with ``n`` experts in every layer and its count fields patched."""
        fields = {f: n for f in self.count_fields} or {"num_experts": n}
        return dataclasses.replace(self, layer_counts={k: n for k in self.layer_counts}, count_fields=fields)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _config_name(config: Mapping[str, Any]) -> str:
    # A GGUF model's config is its metadata, which always names its architecture.
    return "the GGUF metadata" if "general.architecture" in config else "config.json"


def facts_from(config: Mapping[str, Any], tensors: Iterable[tuple[str, str, Sequence[int]]],
               layout: Layout) -> ServingFacts:
    """Facts from a config and ``(name, dtype, shape)`` tensor headers (a checkpoint's or a plan's).

    Expert counts come from the tensors, not the config: dim 0 of fused and router tensors, the
    distinct expert ids of per-expert tensors.
    """
    rows: dict[int, set[int]] = {}
    ids: dict[int, set[int]] = {}
    dtypes, blocks = set(), False
    tensors = list(tensors)
    for name, dtype, shape in tensors:
        t = layout.classify(name)
        if t is None:
            continue
        if t.role == "expert":
            ids.setdefault(t.layer, set()).add(t.expert or 0)
            dtypes.add(dtype)
        elif shape:
            rows.setdefault(t.layer, set()).add(int(shape[0]))
            if t.role == "fused":
                dtypes.add(dtype)
                blocks = blocks or name.endswith(("_blocks", "_scales"))
    counts = {layer: max(v) for layer, v in rows.items()}
    for layer, v in ids.items():
        counts[layer] = len(v)
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    quant_problem = None
    if quant is not None and not (isinstance(quant, dict) and isinstance(method, str)):
        quant_problem = (f"{_config_name(config)}'s quantization_config is {quant!r:.60}; expected an object with a "
                         f"string quant_method (copy the source's quantization_config)")
        method = None
    grouped = layout.group_field is not None
    return ServingFacts(
        family=layout.family,
        layer_counts=dict(sorted(counts.items())),
        # The family's own fields (ERNIE's moe_num_experts / moe_k, Gemma-4's top_k_experts) are
        # what its config class, and so every engine's model file for it, reads.
        count_fields={f: config[f] for f in dict.fromkeys((*layout.count_fields, *COUNT_FIELDS)) if f in config},
        topk_fields={f: config[f] for f in dict.fromkeys((*layout.topk_fields, *TOPK_FIELDS)) if f in config},
        n_group=config.get(layout.group_field) if grouped and layout.group_field else None,
        topk_group=config.get(_topk_group_field(layout)) if grouped else None,
        quant_method=method,
        quant_problem=quant_problem,
        group_field=layout.group_field,
        config_name=_config_name(config),
        expert_dtypes=frozenset(dtypes),
        mxfp4_blocks=blocks,
        quant_modules_problem=module_list_problem(config, layout, tensors),
    )


def _topk_group_field(layout: Layout) -> str:
    """``topk_group``, or for a GGUF model its metadata key ``{arch}.expert_group_used_count``."""
    group = layout.group_field or ""
    return group.replace("expert_group_count", "expert_group_used_count") if group.endswith(".expert_group_count") else "topk_group"


def plan_facts(plan: Plan, layout: Layout) -> ServingFacts:
    """Facts of a plan's output: its patched config and its output tensors' headers."""
    return facts_from(plan.config, ((t.name, t.dtype, t.shape) for o in plan.outputs for t in o.tensors), layout)


def checkpoint_facts(ckpt: Checkpoint) -> ServingFacts:
    """Facts of an opened checkpoint (its family detected from the config)."""
    return facts_from(ckpt.config, ((t.name, t.dtype, t.shape) for t in ckpt.tensors.values()), ckpt.layout)
