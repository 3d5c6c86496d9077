"""How one model family stores experts: which tensors hold experts, and which config fields change.

Two storage styles exist among MoE checkpoints:

* **fused** (gpt-oss, Llama-4, Aria…): every expert tensor of a layer stacks the experts along
  dim 0, so expert ``e`` is one contiguous byte range. Pruning slices rows.
* **per-expert** (Mixtral, Qwen-MoE, DeepSeek…): one tensor per expert (``experts.N.…``).
  Pruning drops whole tensors and renumbers the kept ones.

Either way the router's weight (and bias) rows are experts and are sliced. A :class:`Layout`
classifies tensor names into those roles; everything else is copied unchanged, which is only
right for tensors that do not depend on the expert count: :meth:`Layout.moe_layers` refuses a
checkpoint whose MoE module holds an unclassified tensor with an expert-sized dimension.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from core.errors import CheckpointError
from core.expert_types import (  # noqa: F401 (also this module's names for its importers)
    CheckpointView,
    ExpertTensor,
    MoELayer,
    Role,
    expert_axis,
)
from core.layer_config import configured_moe_layers, int_field, int_list
from core.memo import classified, compiled, remember, tail_classified, tails_of
from core.moe_layers import find_layers
from core.names import after_layer


@dataclass(frozen=True)
class Layout:
    """How one model family stores experts.

    Attributes:
        family: short name (``gpt_oss``); families that differ only in ``model_type`` share one.
        model_types: ``config.json`` ``model_type`` values of the family.
        count_fields: config fields holding the expert count (first is canonical).
        topk_fields: config fields holding the routing top-k (first is canonical).
        fused: regex of fused expert tensors; group ``layer``.
        router: regex of router tensors sliced along dim 0; group ``layer``.
        expert: regex of per-expert tensors; groups ``layer`` and ``expert``.
        group_field: config field of the expert-group count for group-limited routing
            (DeepSeek-V3, GLM-4.5): the kept experts must stay balanced across groups.
        routing: how the family turns router logits into weights (documentation and tests).
        module: regex of the MoE module under a layer (``mlp``); an unclassified tensor in it
            with an expert-sized dimension makes the checkpoint refused.
        shared: regex of tensors in the MoE module that never depend on the expert count
            (shared experts and their gates): copied whole, exempt from that check.
        renormalize_field: config flag that renormalizes the kept top-k weights to sum 1, where
            the router has one.
        architectures: ``architectures`` entries that identify the family when ``model_type``
            does not.
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
    module: str = r"mlp"
    shared: str | None = None
    renormalize_field: str | None = None
    architectures: tuple[str, ...] = ()

    def classify(self, name: str) -> ExpertTensor | None:
        """What pruning does with tensor ``name`` (``None``: copied whole). Pure, so remembered:
        planning a 1 T checkpoint asks it of each of 140,000 names from several steps."""
        return classified(self, name)  # type: ignore[no-any-return]

    def _classify(self, name: str, tails: Mapping[Hashable, Any] | None = None) -> ExpertTensor | None:
        """``tails``: this layout's table of classified tails, for a pass over many names."""
        rest = after_layer(name) if self._layer_led else None
        if rest is not None:  # what follows ``layers.N.`` decides, and is shared by every layer
            layer, key = rest
            role_expert: Any = _UNSEEN if tails is None else tails.get(key, _UNSEEN)
            if role_expert is _UNSEEN:
                role_expert = tail_classified(self, key)
            if role_expert is None:
                return None
            return tuple.__new__(ExpertTensor, (name, layer, *role_expert))  # type: ignore[no-any-return]
        for role, pattern in (("fused", self.fused), ("router", self.router), ("expert", self.expert)):
            if pattern is None:
                continue
            m = compiled(pattern).search(name)
            if m:
                expert = int(m.group("expert")) if role == "expert" else None
                return ExpertTensor(name, int(m.group("layer")), role, expert)  # type: ignore[arg-type]
        return None

    @cached_property
    def _layer_led(self) -> bool:
        """Whether every pattern starts with ``layers.N.`` (all safetensors families do)."""
        return all(p is None or p.startswith(_LAYER) for p in (self.fused, self.router, self.expert))

    def _classify_tail(self, tail: str) -> tuple[str, int | None] | None:
        """Role and expert id of a name whose only ``layers.N.`` is followed by ``tail``: the
        patterns' remainders, matched at the start of ``tail``, in the order of :meth:`_classify`."""
        for role, pattern in (("fused", self.fused), ("router", self.router), ("expert", self.expert)):
            if pattern is None:
                continue
            m = compiled(pattern[len(_LAYER):]).match(tail)
            if m:
                return role, int(m.group("expert")) if role == "expert" else None
        return None

    def renamed(self, t: ExpertTensor, new_expert: int) -> str:
        """Name of per-expert tensor ``t`` once its expert is renumbered to ``new_expert``."""
        assert self.expert is not None and t.role == "expert"
        m = compiled(self.expert).search(t.name)
        assert m is not None
        a, b = m.span("expert")
        return t.name[:a] + str(new_expert) + t.name[b:]

    def num_experts(self, config: Mapping[str, Any], where: str = "config.json") -> int:
        """The expert count of every layer; the largest one where layers differ. A per-layer list
        (Hunyuan's ``num_experts``) must hold one count: differing source counts are refused."""
        return int_field(config, self.count_fields, where, uniform=True)

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
        """The routing top-k; the largest where a per-layer list (Hunyuan's ``moe_topk``) differs."""
        return int_field(config, self.topk_fields, where)

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
            for f in present:
                old = config.get(f)
                if isinstance(old, list):
                    # A per-layer list keeps its form: one entry per layer, each set to the value,
                    # unless it already allows it (a top-k list left as it was).
                    if fields is self.topk_fields and int_list(old) and max(old) == value:
                        continue
                    patch[f] = [value] * len(old)
                else:
                    patch[f] = value
        return patch

    def in_module(self, name: str) -> re.Match[str] | None:
        """Whether ``name`` sits in a layer's MoE module (the match names the layer)."""
        return compiled(_LAYER + f"(?:{self.module})\\.").search(name)

    def moe_layers(self, ckpt: CheckpointView) -> dict[int, MoELayer]:
        """Every MoE layer of ``ckpt`` with its expert tensors, checked against the config.

        Raises:
            CheckpointError: a sliced tensor whose dim 0 is not the expert count, a per-expert
                tensor whose expert id is out of range, an expert missing from a layer, a layer
                without a router, or an unclassified tensor of an MoE module with an
                expert-sized dimension (pruning would copy it unsliced).
        """
        where = ckpt.storage.describe("config.json")
        default = self.num_experts(ckpt.config, where)
        counts = self.layer_counts(ckpt.config, where)
        # Several steps of one command ask; a checkpoint of 100,000+ tensors is classified once per
        # layout and config (a changed config is classified again).
        memo = getattr(ckpt, "derived", None)
        key = ("moe_layers", self, default, tuple(sorted(counts.items())), str(configured_moe_layers(ckpt.config)),
               len(ckpt.tensors))
        if memo is not None and key in memo:
            return dict(memo[key])
        layers = find_layers(self, ckpt, default, counts)
        if memo is not None:
            memo[key] = dict(layers)
        return layers

    def classified_tensors(self, ckpt: CheckpointView) -> dict[str, ExpertTensor]:
        """Every tensor of ``ckpt`` that pruning touches, by name, in the checkpoint's order: one
        pass over the names per command, so that the steps that ask of every tensor look it up."""
        memo = getattr(ckpt, "derived", None)
        key = ("classified", self, len(ckpt.tensors))
        if memo is not None and key in memo:
            return memo[key]  # type: ignore[no-any-return]
        classify, tails = self._classify, tails_of(self)
        every = {name: classify(name, tails) for name in ckpt.tensors}
        remember(self, every)  # for the steps that ask name by name
        found = {name: t for name, t in every.items() if t is not None}
        if memo is not None:
            memo[key] = found
        return found


#: The config field of a checkpoint whose MoE layers keep different numbers of experts:
#: ``{"<layer>": count}``, with the family's count fields set to the largest count. No engine
#: standard exists (transformers and mlx-lm read one count for every layer), so this tool names
#: its own; README "Non-uniform output" says who reads it.
PER_LAYER_FIELD = "num_experts_per_layer"


_LAYER = r"(?:^|\.)layers\.(?P<layer>\d+)\."
_UNSEEN = object()  # a tail not classified yet
