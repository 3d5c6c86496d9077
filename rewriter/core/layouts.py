"""Model families: how each stores its experts (:mod:`rewriter.core.expert_layout`, the
descriptions in :mod:`rewriter.core.families`), and detecting a checkpoint's family from its config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rewriter.core.errors import CheckpointError
from rewriter.core.expert_layout import (
    PER_LAYER_FIELD,
    CheckpointView,
    ExpertTensor,
    Layout,
    MoELayer,
    Role,
    expert_axis,
    mtp_followed,
)
from rewriter.core.families import (
    DEEPSEEK_V3,
    GPT_OSS,
    LAYOUTS,
    MIXTRAL,
    OLMOE,
    QWEN2_MOE,
    QWEN3_MOE,
    REFUSED,
)

__all__ = ["DEEPSEEK_V3", "GPT_OSS", "LAYOUTS", "MIXTRAL", "OLMOE", "QWEN2_MOE", "QWEN3_MOE", "REFUSED",
           "CheckpointView", "ExpertTensor", "Layout", "MoELayer", "PER_LAYER_FIELD", "Role", "detect_layout", "expert_axis", "layout_for_config",
           "mtp_followed"]

#: Config fields that state an expert count in some family (what a refusal reports as found).
_COUNT_HINTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "ffn_config")


def layout_for_config(config: Mapping[str, Any]) -> Layout | None:
    """The layout for a config, by ``model_type`` first, then by ``architectures`` (only for a
    ``model_type`` no description names and no refusal covers)."""
    model_type = config.get("model_type")
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    if model_type in REFUSED:
        return None
    for arch in config.get("architectures") or []:
        for layout in LAYOUTS:
            if arch in layout.architectures:
                return layout
    return None


def detect_layout(ckpt: CheckpointView) -> Layout:
    """The layout of ``ckpt``'s family, from ``config.json`` (``model_type``, architectures).

    Raises:
        CheckpointError: no config, or a family this tool does not prune, naming what was found
            and why it is refused.
    """
    if not ckpt.config:
        raise CheckpointError(f"{ckpt.url}: no config.json, so the model family is unknown")
    layout = layout_for_config(ckpt.config)
    if layout is None:
        raise CheckpointError(refusal(ckpt.config, ckpt.storage.describe("config.json")))
    return layout


def refusal(config: Mapping[str, Any], where: str) -> str:
    """Why a config's model is not pruned here, with the fields found and what to do."""
    model_type = config.get("model_type")
    head = f"{where}: model_type {model_type!r} (architectures {config.get('architectures')})"
    if model_type in REFUSED:
        return f"{head} is refused: {REFUSED[model_type]}"
    found = [f for f in _COUNT_HINTS if f in config]
    what = (f"it has MoE fields {found}, but its expert tensor names and routing are not known here"
            if found else "no expert-count field (num_experts, num_local_experts, n_routed_experts) "
            "was found, so it may not be an MoE model")
    known = ", ".join(sorted(t for lay in LAYOUTS for t in lay.model_types))
    return f"{head} is not a supported MoE family: {what}; supported: {known}"
