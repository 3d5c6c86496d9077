"""A checkpoint's MoE layers found from its classified tensors, and checked: against the config's
expert counts, complete (every expert, a router), and with no unclassified tensor of an MoE module
that depends on the expert count (pruning would copy it unsliced). :meth:`Layout.moe_layers`
calls it once per command."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol

from core.errors import CheckpointError
from core.expert_types import CheckpointView, ExpertTensor, MoELayer, expert_axis
from core.layer_config import check_configured_layers


class Classifies(Protocol):
    """What the checks read of a :class:`core.expert_layout.Layout`."""

    @property
    def family(self) -> str: ...

    @property
    def fused(self) -> str | None: ...

    @property
    def router(self) -> str: ...

    @property
    def shared(self) -> str | None: ...

    @property
    def count_fields(self) -> tuple[str, ...]: ...

    def classified_tensors(self, ckpt: CheckpointView) -> dict[str, ExpertTensor]: ...

    def in_module(self, name: str) -> re.Match[str] | None: ...


def find_layers(layout: Classifies, ckpt: CheckpointView, default: int, counts: Mapping[int, int]) -> dict[int, MoELayer]:
    """Every MoE layer of ``ckpt`` with its expert tensors (:meth:`Layout.moe_layers`, which
    keeps the result per command), each checked against the config."""
    found: dict[int, list[ExpertTensor]] = {}
    tensors = ckpt.tensors
    for t in layout.classified_tensors(ckpt).values():
        info = tensors[t.name]
        if "mtp.layers." in info.name and re.search(r"(?:^|\.)mtp\.layers\.\d+\.", info.name):
            raise CheckpointError(
                f"{ckpt.url}: tensor {info.name!r} is an expert tensor of a multi-token-prediction "
                f"module stored as mtp.layers.K, whose layer number would be taken for decoder layer "
                f"{t.layer}; pruning such checkpoints is not supported yet. Remove the mtp.* tensors "
                f"from the index (serving engines then run without MTP) and prune again"
            )
        n = counts.get(t.layer, default)
        if t.role != "expert" and (not info.shape or info.shape[expert_axis(info.shape)] != n):
            raise CheckpointError(
                f"{ckpt.url}: tensor {info.name!r} has shape {list(info.shape)}; expected "
                f"dim 0 = {n} experts (config {layout.count_fields[0]})"
            )
        if t.role == "expert" and not 0 <= (t.expert or 0) < n:
            raise CheckpointError(
                f"{ckpt.url}: tensor {info.name!r} names expert {t.expert}, but the config "
                f"has {n} experts per layer"
            )
        found.setdefault(t.layer, []).append(t)
    layers = {i: MoELayer(i, counts.get(i, default), tuple(ts)) for i, ts in sorted(found.items())}
    for layer in layers.values():
        _check_complete(layout, ckpt, layer)
    _check_unclassified(layout, ckpt, layers)
    check_configured_layers(ckpt.url, ckpt.config, layers)
    return layers


def _check_complete(layout: Classifies, ckpt: CheckpointView, layer: MoELayer) -> None:
    """Every expert present once per tensor name, and a router to choose among them."""
    roles = {t.role for t in layer.tensors}
    if "router" not in roles:
        raise CheckpointError(
            f"{ckpt.url}: layer {layer.index} has expert tensors but no router tensor "
            f"({layout.family} routers match {layout.router!r}); the experts cannot be pruned "
            f"without slicing the router"
        )
    per_expert = [t for t in layer.tensors if t.role == "expert"]
    if not per_expert:
        return
    ids = {t.expert for t in per_expert}
    missing = sorted(set(range(layer.num_experts)) - ids)
    if missing:
        raise CheckpointError(
            f"{ckpt.url}: layer {layer.index} has no tensors of experts {missing[:8]}, but "
            f"config {layout.count_fields[0]} is {layer.num_experts}"
        )


def _check_unclassified(layout: Classifies, ckpt: CheckpointView, layers: Mapping[int, MoELayer]) -> None:
    classified = layout.classified_tensors(ckpt)
    for info in ckpt.tensors.values():
        # Classified names (a dict lookup) skip the regex: most of a 1 T checkpoint's names.
        m = None if info.name in classified else layout.in_module(info.name)
        if m is None or int(m.group("layer")) not in layers:
            continue
        n = layers[int(m.group("layer"))].num_experts
        if layout.shared is not None and re.search(layout.shared, info.name):
            continue
        numbered = re.search(r"\bexperts\.(\d+)\.", info.name[m.end():])
        if numbered:  # a per-expert tensor (a quantized checkpoint's) where this layout fuses experts
            raise CheckpointError(
                f"{ckpt.url}: tensor {info.name!r} of MoE layer {m.group('layer')} belongs to expert "
                f"{numbered.group(1)} by its name, but the {layout.family} layout stores experts fused "
                f"({layout.fused}); refusing rather than copying every expert's tensors unpruned "
                f"(model_type {ckpt.config.get('model_type')!r})"
            )
        if n in info.shape:
            raise CheckpointError(
                f"{ckpt.url}: tensor {info.name!r} of MoE layer {m.group('layer')} has shape "
                f"{list(info.shape)}, a dimension of {n} (the expert count), but the "
                f"{layout.family} layout does not say how it depends on the experts; refusing "
                f"rather than copying it unsliced (model_type {ckpt.config.get('model_type')!r})"
            )
