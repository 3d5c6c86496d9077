"""Model families: how each stores its experts (:mod:`core.expert_layout`, the
descriptions in :mod:`core.families`), and detecting a checkpoint's family from its config."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from core.errors import CheckpointError
from core.expert_layout import (
    PER_LAYER_FIELD,
    CheckpointView,
    ExpertTensor,
    Layout,
    MoELayer,
    Role,
    expert_axis,
)
from core.families import (
    DEEPSEEK_V3,
    GPT_OSS,
    LAYOUTS,
    MIXTRAL,
    OLMOE,
    QWEN2_MOE,
    QWEN3_MOE,
    REFUSED,
)
from core.layer_config import mtp_followed

__all__ = ["DEEPSEEK_V3", "GPT_OSS", "LAYOUTS", "MIXTRAL", "OLMOE", "QWEN2_MOE", "QWEN3_MOE", "REFUSED",
           "CheckpointView", "ExpertTensor", "Layout", "MoELayer", "PER_LAYER_FIELD", "Role", "detect_layout", "expert_axis", "layout_for_config",
           "mtp_followed"]

#: Config fields that state an expert count in some family (what a refusal reports as found).
_COUNT_HINTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "ffn_config")
#: Config fields that state a routing top-k in some family.
_TOPK_HINTS = ("num_experts_per_tok", "experts_per_token", "num_experts_per_token", "moe_topk", "moe_k",
               "top_k_experts")
#: Tensor names that look like experts or routers, whatever the family.
_MOE_NAME = re.compile(r"expert|router|\.gate\.|moe")


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
        raise CheckpointError(refusal(ckpt.config, ckpt.storage.describe("config.json"), ckpt.tensors))
    return layout


def refusal(config: Mapping[str, Any], where: str, names: Iterable[str] = ()) -> str:
    """Why a config's model is not pruned here: the reason, the config fields and expert-like
    tensors found, and what is missing."""
    model_type = config.get("model_type")
    head = f"{where}: model_type {model_type!r} (architectures {config.get('architectures')})"
    seen = _found(config, names)
    if model_type in REFUSED:
        return f"{head} is refused because {REFUSED[model_type]}; found {seen}"
    counted = [f for f in _COUNT_HINTS if f in config]
    what = (f"it has MoE fields {counted}, but what is missing is a description of its expert tensor names "
            f"and routing (no family here stores experts as it does)"
            if counted else "no expert-count field (num_experts, num_local_experts, n_routed_experts) "
            "was found, so it may not be an MoE model")
    known = ", ".join(sorted(t for lay in LAYOUTS for t in lay.model_types))
    return f"{head} is not a supported MoE family: {what}; found {seen}; supported: {known}"


def _found(config: Mapping[str, Any], names: Iterable[str]) -> str:
    """The expert-count and top-k fields of ``config`` and the expert-like tensor names, in short."""
    fields = {f: config[f] for f in (*_COUNT_HINTS, *_TOPK_HINTS) if f in config}
    moe = sorted(n for n in names if _MOE_NAME.search(n))
    shown = ", ".join(moe[:3]) + (f" and {len(moe) - 3} more" if len(moe) > 3 else "")
    return (f"config fields {json.dumps(fields, default=str)[:200]}, "
            f"{f'{len(moe)} expert or router tensors ({shown})' if moe else 'no expert or router tensor'}")
