"""The records of what pruning touches in a checkpoint (an expert tensor, an MoE layer) and what
a layout reads of a checkpoint, apart from the layouts themselves so that the checks of MoE layers
(:mod:`core.moe_layers`) and the layouts (:mod:`core.expert_layout`) both use them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol


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
    """The parts of :class:`core.checkpoint.Checkpoint` a layout reads."""

    @property
    def url(self) -> str: ...

    @property
    def config(self) -> Mapping[str, Any]: ...

    @property
    def tensors(self) -> Mapping[str, _Tensor]: ...

    @property
    def storage(self) -> _Describes: ...


Role = Literal["fused", "router", "expert"]


class ExpertTensor(NamedTuple):
    """A tensor that pruning touches.

    ``fused`` and ``router`` tensors are sliced along dim 0 (one row per expert); an ``expert``
    tensor belongs to one expert (``expert``) and is kept whole or dropped. (A named tuple: a 1 T
    checkpoint classifies 140,000 names.)
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


def expert_axis(shape: Sequence[int]) -> int:
    """The expert dimension of a sliced tensor: dim 0, or the first after leading 1s (a router
    bias stored ``[1, E]``). Either way one expert is one contiguous byte range."""
    for i, d in enumerate(shape[:-1]):
        if d != 1:
            return i
    return max(len(shape) - 1, 0)
