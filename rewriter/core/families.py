"""The family descriptions: data, one per way of storing experts, shared by every ``model_type``
that stores them that way. ``tests/test_every_family.py`` checks each against the model's own
code (a tiny model of every listed ``model_type``, built, saved, pruned and compared)."""

from __future__ import annotations

import dataclasses

from rewriter.core.expert_layout import _LAYER, Layout

_L = _LAYER
_PER_EXPERT = _L + r"mlp\.experts\.(?P<expert>\d+)\."
_SHARED = r"\.(?:shared_experts?|shared_expert_gate|shared_mlp)\."
_SOFTMAX_ALL = "softmax over all experts, top-k, renormalized when norm_topk_prob"
_SIGMOID_GROUPS = ("sigmoid scores; choice by score + correction bias within the top topk_group groups "
                   "(group score: sum of its two best); weights from the scores, renormalized, scaled")

GPT_OSS = Layout(
    family="gpt_oss",
    model_types=("gpt_oss",),
    count_fields=("num_local_experts", "num_experts"),
    topk_fields=("num_experts_per_tok", "experts_per_token"),
    fused=_L + r"mlp\.experts\.(?:gate_up_proj|down_proj)(?:_blocks|_scales|_bias)?$",
    router=_L + r"mlp\.router\.(?:weight|bias)$",
    architectures=("GptOssForCausalLM",),
)

QWEN3_MOE = Layout(
    family="qwen3_moe",
    model_types=("qwen3_moe",),
    count_fields=("num_experts", "num_local_experts"),
    topk_fields=("num_experts_per_tok",),
    expert=_PER_EXPERT,
    router=_L + r"mlp\.gate\.weight$",
    routing=_SOFTMAX_ALL,
    shared=_SHARED,
    renormalize_field="norm_topk_prob",
    architectures=("Qwen3MoeForCausalLM",),
)
# Qwen2-MoE: as Qwen3-MoE; mlp.shared_expert.* and mlp.shared_expert_gate are never pruned.
QWEN2_MOE = dataclasses.replace(
    QWEN3_MOE, family="qwen2_moe", model_types=("qwen2_moe",),
    routing=_SOFTMAX_ALL + "; plus a gated shared expert", architectures=("Qwen2MoeForCausalLM",),
)
OLMOE = dataclasses.replace(QWEN3_MOE, family="olmoe", model_types=("olmoe",), architectures=("OlmoeForCausalLM",))
MIXTRAL = Layout(
    family="mixtral",
    model_types=("mixtral",),
    count_fields=("num_local_experts", "num_experts"),
    topk_fields=("num_experts_per_tok",),
    expert=_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.",
    router=_L + r"block_sparse_moe\.gate\.weight$",
    routing="top-k of the logits, softmax over those k",
    module=r"block_sparse_moe",
    architectures=("MixtralForCausalLM",),
)
DEEPSEEK_V3 = Layout(
    family="deepseek_v3",
    model_types=("deepseek_v3", "glm4_moe"),
    count_fields=("n_routed_experts",),
    topk_fields=("num_experts_per_tok",),
    expert=_PER_EXPERT,  # FP8 weight_scale_inv tensors sit under the expert and move with it
    router=_L + r"mlp\.gate\.(?:weight|e_score_correction_bias)$",
    group_field="n_group",
    routing=_SIGMOID_GROUPS,
    shared=_SHARED,
    renormalize_field="norm_topk_prob",
    architectures=("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM"),
)

LAYOUTS: tuple[Layout, ...] = (GPT_OSS, QWEN3_MOE, QWEN2_MOE, MIXTRAL, OLMOE, DEEPSEEK_V3)

#: Model types of MoE families whose experts cannot be pruned by dropping them without changing
#: what the model computes, with the reason (shown by ``inspect`` and every command that opens one).
REFUSED: dict[str, str] = {}
