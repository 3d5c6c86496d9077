"""Model-family expert layouts: which tensors hold experts, and which config fields change.

Two storage styles exist among MoE checkpoints:

* **fused** (gpt-oss): every expert tensor of a layer stacks the experts along dim 0, so expert
  ``e`` is one contiguous byte range. Pruning slices rows.
* **per-expert** (Mixtral, Qwen-MoE, DeepSeek…): one tensor per expert (``experts.N.…``).
  Pruning drops whole tensors and renumbers the kept ones.

Either way the router's weight (and bias) rows are experts and are sliced. A :class:`Layout`
classifies tensor names into those roles; everything else is copied unchanged. Adding a family
means adding a :class:`Layout` to :data:`LAYOUTS`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from rewriter.core.errors import CheckpointError


# What a layout reads of a checkpoint. Structural types, so that the checkpoint model can detect
# its own layout without this module importing it.
class _Tensor(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


class _Describes(Protocol):
    def describe(self, name: str) -> str: ...


class CheckpointView(Protocol):
    """The parts of :class:`rewriter.core.checkpoint.Checkpoint` a layout reads."""

    @property
    def url(self) -> str: ...

    @property
    def config(self) -> Mapping[str, Any]: ...

    @property
    def tensors(self) -> Mapping[str, _Tensor]: ...

    @property
    def storage(self) -> _Describes: ...

Role = Literal["fused", "router", "expert"]


@dataclass(frozen=True)
class ExpertTensor:
    """A tensor that pruning touches.

    ``fused`` and ``router`` tensors are sliced along dim 0 (one row per expert); an ``expert``
    tensor belongs to one expert (``expert``) and is kept whole or dropped.
    """

    name: str
    layer: int
    role: Role
    expert: int | None = None


@dataclass(frozen=True)
class MoELayer:
    """A layer's expert tensors, validated against the config's expert count."""

    index: int
    num_experts: int
    tensors: tuple[ExpertTensor, ...]


@dataclass(frozen=True)
class Layout:
    """How one model family stores experts.

    Attributes:
        family: short name (``gpt_oss``).
        model_types: ``config.json`` ``model_type`` values of the family.
        count_fields: config fields holding the expert count (first is canonical).
        topk_fields: config fields holding the routing top-k (first is canonical).
        fused: regex of fused expert tensors; group ``layer``.
        router: regex of router tensors sliced along dim 0; group ``layer``.
        expert: regex of per-expert tensors; groups ``layer`` and ``expert``.
        group_field: config field of the expert-group count for group-limited routing
            (DeepSeek-V3, GLM-4.5): the kept experts must stay balanced across groups.
        routing: how the family turns router logits into weights (documentation and tests).
    """

    family: str
    model_types: tuple[str, ...]
    count_fields: tuple[str, ...]
    topk_fields: tuple[str, ...]
    router: str
    fused: str | None = None
    expert: str | None = None
    group_field: str | None = None
    routing: str = "softmax over the top-k logits"

    def classify(self, name: str) -> ExpertTensor | None:
        for role, pattern in (("fused", self.fused), ("router", self.router), ("expert", self.expert)):
            if pattern is None:
                continue
            m = re.search(pattern, name)
            if m:
                expert = int(m.group("expert")) if role == "expert" else None
                return ExpertTensor(name, int(m.group("layer")), role, expert)  # type: ignore[arg-type]
        return None

    def renamed(self, t: ExpertTensor, new_expert: int) -> str:
        """Name of per-expert tensor ``t`` once its expert is renumbered to ``new_expert``."""
        assert self.expert is not None and t.role == "expert"
        m = re.search(self.expert, t.name)
        assert m is not None
        a, b = m.span("expert")
        return t.name[:a] + str(new_expert) + t.name[b:]

    def num_experts(self, config: Mapping[str, Any], where: str = "config.json") -> int:
        """The expert count of every layer; the largest one where layers differ."""
        return _int_field(config, self.count_fields, where)

    def layer_counts(self, config: Mapping[str, Any], where: str = "config.json") -> dict[int, int]:
        """Per-layer expert counts of a checkpoint whose layers keep different numbers of
        experts (:data:`PER_LAYER_FIELD`); empty when every layer has :meth:`num_experts`."""
        v = config.get(PER_LAYER_FIELD)
        if v is None:
            return {}
        ok = isinstance(v, dict) and v and all(
            isinstance(k, str) and k.isascii() and k.isdigit() and isinstance(n, int)
            and not isinstance(n, bool) and n > 0 for k, n in v.items())
        if not ok:
            raise CheckpointError(f"{where}: {PER_LAYER_FIELD} is {str(v)[:60]}; expected an object of "
                                  f"layer number -> expert count (a positive integer)")
        return {int(k): n for k, n in v.items()}

    def min_experts(self, config: Mapping[str, Any], where: str = "config.json") -> int:
        """The smallest expert count of any layer: what the routing top-k must not exceed."""
        counts = self.layer_counts(config, where)
        return min(counts.values()) if counts else self.num_experts(config, where)

    def top_k(self, config: Mapping[str, Any], where: str = "config.json") -> int:
        return _int_field(config, self.topk_fields, where)

    def num_groups(self, config: Mapping[str, Any]) -> int:
        """Expert groups of group-limited routing (1 when the family has none)."""
        if self.group_field is None:
            return 1
        v = config.get(self.group_field)
        return v if isinstance(v, int) and v > 0 else 1

    def config_patch(self, config: Mapping[str, Any], kept: int, top_k: int) -> dict[str, Any]:
        """The config fields to set for ``kept`` experts per layer and routing ``top_k``."""
        patch: dict[str, Any] = {}
        for fields, value in ((self.count_fields, kept), (self.topk_fields, top_k)):
            present = [f for f in fields if f in config] or [fields[0]]
            patch.update({f: value for f in present})
        return patch

    def moe_layers(self, ckpt: CheckpointView) -> dict[int, MoELayer]:
        """Every MoE layer of ``ckpt`` with its expert tensors, checked against the config.

        Raises:
            CheckpointError: a sliced tensor whose dim 0 is not the expert count, or a
                per-expert tensor whose expert id is out of range.
        """
        where = ckpt.storage.describe("config.json")
        default = self.num_experts(ckpt.config, where)
        counts = self.layer_counts(ckpt.config, where)
        found: dict[int, list[ExpertTensor]] = {}
        for info in ckpt.tensors.values():
            t = self.classify(info.name)
            if t is None:
                continue
            n = counts.get(t.layer, default)
            if t.role != "expert" and (not info.shape or info.shape[0] != n):
                raise CheckpointError(
                    f"{ckpt.url}: tensor {info.name!r} has shape {list(info.shape)}; expected "
                    f"dim 0 = {n} experts (config {self.count_fields[0]})"
                )
            if t.role == "expert" and not 0 <= (t.expert or 0) < n:
                raise CheckpointError(
                    f"{ckpt.url}: tensor {info.name!r} names expert {t.expert}, but the config "
                    f"has {n} experts per layer"
                )
            found.setdefault(t.layer, []).append(t)
        return {i: MoELayer(i, counts.get(i, default), tuple(ts)) for i, ts in sorted(found.items())}


def _int_field(config: Mapping[str, Any], fields: Sequence[str], where: str) -> int:
    for f in fields:
        v = config.get(f)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    raise CheckpointError(f"{where}: expected an integer field {' or '.join(fields)}")


#: The config field of a checkpoint whose MoE layers keep different numbers of experts:
#: ``{"<layer>": count}``, with the family's count fields set to the largest count. No engine
#: standard exists (transformers and mlx-lm read one count for every layer), so this tool names
#: its own; README "Non-uniform output" says who reads it.
PER_LAYER_FIELD = "num_experts_per_layer"


_L = r"(?:^|\.)layers\.(?P<layer>\d+)\."

GPT_OSS = Layout(
    family="gpt_oss",
    model_types=("gpt_oss",),
    count_fields=("num_local_experts", "num_experts"),
    topk_fields=("num_experts_per_tok", "experts_per_token"),
    fused=_L + r"mlp\.experts\.(?:gate_up_proj|down_proj)(?:_blocks|_scales|_bias)?$",
    router=_L + r"mlp\.router\.(?:weight|bias)$",
)

_PER_EXPERT = _L + r"mlp\.experts\.(?P<expert>\d+)\."

QWEN3_MOE = Layout(
    family="qwen3_moe",
    model_types=("qwen3_moe",),
    count_fields=("num_experts", "num_local_experts"),
    topk_fields=("num_experts_per_tok",),
    expert=_PER_EXPERT,
    router=_L + r"mlp\.gate\.weight$",
    routing="softmax over all experts, top-k, renormalized when norm_topk_prob",
)
# Qwen2-MoE: as Qwen3-MoE; mlp.shared_expert.* and mlp.shared_expert_gate are never pruned (no
# pattern matches them).
QWEN2_MOE = dataclasses.replace(
    QWEN3_MOE, family="qwen2_moe", model_types=("qwen2_moe",),
    routing="softmax over all experts, top-k, renormalized when norm_topk_prob; plus a gated shared expert",
)
OLMOE = dataclasses.replace(QWEN3_MOE, family="olmoe", model_types=("olmoe",))
MIXTRAL = Layout(
    family="mixtral",
    model_types=("mixtral",),
    count_fields=("num_local_experts", "num_experts"),
    topk_fields=("num_experts_per_tok",),
    expert=_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.",
    router=_L + r"block_sparse_moe\.gate\.weight$",
    routing="top-k of the logits, softmax over those k",
)
DEEPSEEK_V3 = Layout(
    family="deepseek_v3",
    model_types=("deepseek_v3", "glm4_moe"),
    count_fields=("n_routed_experts",),
    topk_fields=("num_experts_per_tok",),
    expert=_PER_EXPERT,  # FP8 weight_scale_inv tensors sit under the expert and move with it
    router=_L + r"mlp\.gate\.(?:weight|e_score_correction_bias)$",
    group_field="n_group",
    routing="sigmoid scores; choice by score + correction bias within the top topk_group groups "
            "(group score: sum of its two best); weights from the scores, renormalized, scaled",
)

LAYOUTS: tuple[Layout, ...] = (GPT_OSS, QWEN3_MOE, QWEN2_MOE, MIXTRAL, OLMOE, DEEPSEEK_V3)


_ARCHITECTURES = {
    "GptOssForCausalLM": GPT_OSS, "Qwen3MoeForCausalLM": QWEN3_MOE, "Qwen2MoeForCausalLM": QWEN2_MOE,
    "MixtralForCausalLM": MIXTRAL, "OlmoeForCausalLM": OLMOE, "DeepseekV3ForCausalLM": DEEPSEEK_V3,
    "Glm4MoeForCausalLM": DEEPSEEK_V3,
}


def layout_for_config(config: Mapping[str, Any]) -> Layout | None:
    """The layout for a config, by ``model_type`` first, then by ``architectures``."""
    model_type = config.get("model_type")
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    for arch in config.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    return None


def detect_layout(ckpt: CheckpointView) -> Layout:
    """The layout of ``ckpt``'s family, from ``config.json`` (``model_type``, architectures).

    Raises:
        CheckpointError: no config, or a family this tool does not know, naming what was found.
    """
    if not ckpt.config:
        raise CheckpointError(f"{ckpt.url}: no config.json, so the model family is unknown")
    layout = layout_for_config(ckpt.config)
    if layout is None:
        known = ", ".join(t for lay in LAYOUTS for t in lay.model_types)
        moe_fields = [f for f in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
                      if f in ckpt.config]
        what = (f"it has MoE fields {moe_fields}, but its expert tensor names and routing are not known here"
                if moe_fields else "no expert-count field (num_experts, num_local_experts, n_routed_experts) "
                "was found, so it may not be an MoE model")
        raise CheckpointError(
            f"{ckpt.storage.describe('config.json')}: model_type "
            f"{ckpt.config.get('model_type')!r} (architectures "
            f"{ckpt.config.get('architectures')}) is not a supported MoE family: {what}; supported: {known}"
        )
    return layout
