"""GGUF expert layouts: llama.cpp's tensor names and metadata keys per architecture.

llama.cpp names tensors ``blk.N.<role>``. Every architecture with routed experts stores them the
same way, so one table of names serves all of them; the architecture decides the family (whose
routing, saliency and serving rules apply) and the metadata keys (``{arch}.expert_count``…).

* ``ffn_{gate,up,down}_exps`` and the fused ``ffn_gate_up_exps`` (weights, and gpt-oss's biases)
  hold the experts along their outermost extent: sliced.
* ``ffn_gate_inp`` (router weight and bias) and ``exp_probs_b`` (DeepSeek-V3/GLM-4.5's
  selection bias) have one row per expert: sliced.
* ``ffn_*_shexp`` (shared experts), ``ffn_gate_inp_shexp`` and dense layers' ``ffn_*`` are copied.
* Old Mixtral conversions store one tensor per expert (``blk.N.ffn_gate.E.weight``): dropped or
  renumbered like the per-expert safetensors families.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.errors import CheckpointError
from core.layouts import Layout

_BLK = r"^blk\.(?P<layer>\d+)\."
FUSED = _BLK + r"ffn_(?:gate|up|down|gate_up)_exps\.(?:weight|bias|scale)$"
ROUTER = _BLK + r"(?:ffn_gate_inp\.(?:weight|bias)|exp_probs_b(?:\.bias)?)$"
PER_EXPERT = _BLK + r"ffn_(?:gate|up|down)\.(?P<expert>\d+)\.weight$"

#: llama.cpp architecture -> (family, routing as llama.cpp computes it).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "gpt-oss": ("gpt_oss", "top-k of the logits (router bias included), softmax over those k"),
    "qwen3moe": ("qwen3_moe", "softmax over all experts, top-k, renormalized"),
    "qwen2moe": ("qwen2_moe", "softmax over all experts, top-k; plus a gated shared expert"),
    "olmoe": ("olmoe", "softmax over all experts, top-k"),
    "llama": ("mixtral", "top-k of the logits, softmax over those k"),
    "deepseek2": ("deepseek_v3", "sigmoid scores; choice by score + exp_probs_b within the best groups"),
    "glm4moe": ("deepseek_v3", "sigmoid scores; choice by score + exp_probs_b within the best groups"),
}


#: Families whose router renormalizes the kept top-k weights only when a switch says so (in GGUF
#: metadata ``{arch}.expert_weights_norm``); gpt-oss and Mixtral always do.
_RENORMALIZED = ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def gguf_layout(metadata: Mapping[str, Any], where: str) -> Layout:
    """The expert layout of a GGUF file, from ``general.architecture`` and its expert count.

    Raises:
        CheckpointError: no architecture, one without a known expert layout, or no experts.
    """
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{where}: no general.architecture string in the GGUF metadata")
    count = f"{arch}.expert_count"
    known = ", ".join(sorted(ARCHITECTURES))
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{where}: llama.cpp architecture {arch!r} is not one whose experts this "
                              f"tool knows; supported: {known}")
    if not isinstance(metadata.get(count), int) or metadata[count] < 1:
        raise CheckpointError(f"{where}: architecture {arch!r} without a positive {count}: not a "
                              f"mixture-of-experts model, so there are no experts to prune")
    family, routing = ARCHITECTURES[arch]
    return Layout(
        family=family,
        model_types=(arch,),
        count_fields=(count,),
        topk_fields=(f"{arch}.expert_used_count",),
        router=ROUTER,
        fused=FUSED,
        expert=PER_EXPERT,
        group_field=f"{arch}.expert_group_count" if family == "deepseek_v3" else None,
        routing=routing,
        renormalize_field=f"{arch}.expert_weights_norm" if family in _RENORMALIZED else None,
    )
