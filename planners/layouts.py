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

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rewriter.errors import CheckpointError

if TYPE_CHECKING:
    from rewriter.checkpoint import Checkpoint

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

    def sliced(self) -> list[ExpertTensor]:
        return [t for t in self.tensors if t.role != "expert"]

    def per_expert(self, expert: int) -> list[ExpertTensor]:
        return [t for t in self.tensors if t.role == "expert" and t.expert == expert]


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
        router_bias: template of the router bias tensor name (``{layer}``), for soft pruning.
    """

    family: str
    model_types: tuple[str, ...]
    count_fields: tuple[str, ...]
    topk_fields: tuple[str, ...]
    router: str
    fused: str | None = None
    expert: str | None = None
    router_bias: str | None = None

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
        return _int_field(config, self.count_fields, where)

    def top_k(self, config: Mapping[str, Any], where: str = "config.json") -> int:
        return _int_field(config, self.topk_fields, where)

    def config_patch(self, config: Mapping[str, Any], kept: int, top_k: int) -> dict[str, Any]:
        """The config fields to set for ``kept`` experts per layer and routing ``top_k``."""
        patch: dict[str, Any] = {}
        for f in self.count_fields:
            if f in config or f == self.count_fields[0]:
                patch[f] = kept
        for f in self.topk_fields:
            if f in config or f == self.topk_fields[0]:
                patch[f] = top_k
        return patch

    def moe_layers(self, ckpt: Checkpoint) -> dict[int, MoELayer]:
        """Every MoE layer of ``ckpt`` with its expert tensors, checked against the config.

        Raises:
            CheckpointError: a sliced tensor whose dim 0 is not the expert count, or a
                per-expert tensor whose expert id is out of range.
        """
        n = self.num_experts(ckpt.config, ckpt.storage.describe("config.json"))
        found: dict[int, list[ExpertTensor]] = {}
        for info in ckpt.tensors.values():
            t = self.classify(info.name)
            if t is None:
                continue
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
        return {i: MoELayer(i, n, tuple(ts)) for i, ts in sorted(found.items())}


def _int_field(config: Mapping[str, Any], fields: Sequence[str], where: str) -> int:
    for f in fields:
        v = config.get(f)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    raise CheckpointError(f"{where}: expected an integer field {' or '.join(fields)}")


_L = r"(?:^|\.)layers\.(?P<layer>\d+)\."

GPT_OSS = Layout(
    family="gpt_oss",
    model_types=("gpt_oss",),
    count_fields=("num_local_experts", "num_experts"),
    topk_fields=("num_experts_per_tok", "experts_per_token"),
    fused=_L + r"mlp\.experts\.(?:gate_up_proj|down_proj)(?:_blocks|_scales|_bias)?$",
    router=_L + r"mlp\.router\.(?:weight|bias)$",
    router_bias="model.layers.{layer}.mlp.router.bias",
)

LAYOUTS: tuple[Layout, ...] = (GPT_OSS,)


def layout_for_config(config: Mapping[str, Any]) -> Layout | None:
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
        if any(a.lower().startswith(layout.family.replace("_", "")) for a in archs):
            return layout
    return None


def detect_layout(ckpt: Checkpoint) -> Layout:
    """The layout of ``ckpt``'s family, from ``config.json`` (``model_type``, architectures).

    Raises:
        CheckpointError: no config, or a family this tool does not know, naming what was found.
    """
    if not ckpt.config:
        raise CheckpointError(f"{ckpt.url}: no config.json, so the model family is unknown")
    layout = layout_for_config(ckpt.config)
    if layout is None:
        known = ", ".join(t for lay in LAYOUTS for t in lay.model_types)
        raise CheckpointError(
            f"{ckpt.storage.describe('config.json')}: model_type "
            f"{ckpt.config.get('model_type')!r} (architectures "
            f"{ckpt.config.get('architectures')}) is not a supported MoE family; supported: {known}"
        )
    return layout
