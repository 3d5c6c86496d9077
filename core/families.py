"""The family descriptions: data, one per way of storing experts, shared by every ``model_type``
that stores them that way. ``tests/e2e/test_every_family.py`` checks each against the model's own
code (a tiny model of every listed ``model_type``, built, saved, pruned and compared)."""

from __future__ import annotations

import dataclasses
import re

from core.expert_layout import _LAYER, Layout

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


_COUNT = ("num_experts", "num_local_experts")
_ROUTED = ("n_routed_experts",)
_TOPK = ("num_experts_per_tok",)


def _moe(family: str, model_types: tuple[str, ...], *, count: tuple[str, ...], module: str = "mlp",
         router: tuple[str, ...] = ("gate.weight",), experts: str = "experts", per_expert: bool = True,
         fused: tuple[str, ...] = (), topk: tuple[str, ...] = _TOPK, routing: str = _SOFTMAX_ALL,
         group_field: str | None = None, renormalize_field: str | None = "norm_topk_prob",
         architectures: tuple[str, ...] = ()) -> Layout:
    """A description from the names under a layer's MoE module ``module``: router tensors (sliced),
    and either per-expert tensors ``<experts>.N.…`` or fused tensors ``fused`` (expert dim 0)."""
    mod = _L + f"(?:{module})\\."
    names = "|".join(re.escape(r) for r in router)
    return Layout(
        family=family, model_types=model_types, count_fields=count, topk_fields=topk,
        router=mod + f"(?:{names})$",
        expert=mod + re.escape(experts) + r"\.(?P<expert>\d+)\." if per_expert else None,
        fused=mod + "(?:" + "|".join(re.escape(f) for f in fused) + ")$" if fused else None,
        group_field=group_field, routing=routing, module=module, shared=_SHARED,
        renormalize_field=renormalize_field, architectures=architectures,
    )


_BIASED = "softmax (or sigmoid, per config) scores; choice by score + a selection bias; weights from the scores"
_FUSED_PROJ = ("experts.gate_up_proj", "experts.down_proj")

#: Per-expert ``mlp.experts.N.*`` with only ``mlp.gate.weight`` as router.
PER_EXPERT_GATE = _moe("per_expert_gate", ("cohere2_moe", "deepseek_v2", "flex_olmo", "mellum", "qwen3_5_moe_text",
                                           "qwen3_next", "qwen4_exp_text", "flint"),
                       count=(*_COUNT, *_ROUTED))
#: Per-expert with a score-correction bias beside the router weight (DeepSeek-V3 style).
PER_EXPERT_CORRECTED = _moe("per_expert_corrected", ("axk1", "axk2", "glm4_moe_lite", "minicpm5_moe", "mimo_v2_flash",
                                                     "sarvam_mla", "solar_open", "deepseek_v32", "glm_moe_dsa",
                                                     "dots3_note_text", "dots1", "beam"),
                            count=(*_ROUTED, *_COUNT), router=("gate.weight", "gate.e_score_correction_bias"),
                            routing=_SIGMOID_GROUPS, group_field="n_group")
#: Per-expert with the selection bias named ``expert_bias`` under the gate.
PER_EXPERT_GATE_BIAS = _moe("per_expert_gate_bias", ("param2moe", "sarvam_moe", "bailing_hybrid"),
                            count=(*_ROUTED, *_COUNT), router=("gate.weight", "gate.expert_bias"),
                            topk=(*_TOPK, "num_experts_per_token"), routing=_BIASED, group_field="n_group")
#: Per-expert with the selection bias directly under the MoE module.
PER_EXPERT_MODULE_BIAS = _moe("per_expert_module_bias", ("exaone_moe", "minimax_m2"), module="mlp|block_sparse_moe",
                              count=_COUNT, router=("gate.weight", "e_score_correction_bias"), routing=_BIASED,
                              group_field="n_group")
LAGUNA = _moe("laguna", ("laguna",), count=_COUNT, router=("gate.weight", "experts.e_score_correction_bias"),
              routing=_BIASED)
ERNIE = _moe("ernie4_5_moe", ("ernie4_5_moe",), count=("moe_num_experts",), topk=("moe_k",),
             router=("gate.weight", "moe_statics.e_score_correction_bias"), routing=_BIASED, renormalize_field=None)
#: A router module ``mlp.router.gate`` and the selection bias under ``mlp``.
ROUTER_GATE = _moe("router_gate", ("afmoe", "hy_v3"), count=_COUNT, router=("router.gate.weight", "expert_bias"),
                   routing=_BIASED)
HUNYUAN = _moe("hunyuan_v1_moe", ("hunyuan_v1_moe",), count=_COUNT, topk=("moe_topk", *_TOPK),
               router=("gate.wg.weight",), routing="softmax over all experts, top-k, renormalized",
               renormalize_field=None)
#: Mixtral-style ``w1``/``w2``/``w3`` per expert under ``block_sparse_moe``, with correction bias.
KIMI_LINEAR = _moe("kimi_linear", ("kimi_linear",), module="block_sparse_moe", count=_COUNT,
                   topk=("num_experts_per_token", *_TOPK), router=("gate.weight", "gate.e_score_correction_bias"),
                   routing=_SIGMOID_GROUPS, group_field="num_expert_group", renormalize_field="moe_renormalize")
#: Router weight under ``mlp``, its selection bias under a sibling ``moe.router`` module.
KOLIBRI = _moe("kolibri", ("kolibri1", "kolibri1_1"), module="mlp|moe", count=_COUNT,
               router=("gate.weight", "router.expert_bias"), routing=_BIASED)
MINIMAX = dataclasses.replace(MIXTRAL, family="mixtral_like", model_types=("minimax", "phimoe"), architectures=())
JAMBA = _moe("jamba", ("jamba",), module="feed_forward", count=_COUNT, router=("router.weight",),
             routing="top-k of the softmax over all experts, not renormalized", renormalize_field=None)
NEMOTRON_H = _moe("nemotron_h", ("nemotron_h",), module="mixer", count=_ROUTED,
                  router=("gate.weight", "gate.e_score_correction_bias"), routing=_SIGMOID_GROUPS, group_field="n_group")
#: Fused 3-D expert tensors, expert first.
FUSED_GATE = _moe("fused_gate", ("lara_mini",), count=_COUNT, per_expert=False, fused=_FUSED_PROJ)
FUSED_CORRECTED = _moe("fused_corrected", ("minimax_m3_vl_text", "hy_v4"), count=(*_COUNT, *_ROUTED),
                       per_expert=False, fused=_FUSED_PROJ, router=("gate.weight", "gate.e_score_correction_bias"),
                       routing=_SIGMOID_GROUPS, group_field="n_group")
INKLING2 = _moe("inkling2", ("inkling2_text", "inkling2_loop_text"), count=_ROUTED, per_expert=False,
                fused=("experts.w13_weight", "experts.w2_weight"), router=("gate.weight", "gate.bias"),
                routing=_BIASED)
#: Fused experts and the router directly under the layer; the router's per-expert output scale is
#: sliced with it.
GEMMA4 = _moe("gemma4", ("gemma4_text",), module="experts|router", count=("num_experts",), topk=("top_k_experts",),
              per_expert=False, fused=("gate_up_proj", "down_proj"), router=("proj.weight", "per_expert_scale"),
              routing="softmax over all experts, top-k, renormalized, times a per-expert scale",
              renormalize_field=None)
LFM2 = _moe("lfm2_moe", ("lfm2_moe",), module="feed_forward", count=_COUNT, router=("gate.weight", "expert_bias"),
            routing=_BIASED)
LLAMA4 = _moe("llama4", ("llama4_text",), module="feed_forward", count=_COUNT, per_expert=False, fused=_FUSED_PROJ,
              router=("router.weight",), routing="top-k of the logits, sigmoid of each chosen logit (no softmax)",
              renormalize_field=None)
ARIA = _moe("aria", ("aria_text",), count=("moe_num_experts",), topk=("moe_topk",), per_expert=False,
            fused=("experts.fc1.weight", "experts.fc2.weight"), router=("router.weight",),
            routing="top-k of the logits, softmax over those k", renormalize_field=None)
GRANITE = _moe("granitemoe", ("granitemoe", "granitemoeshared", "granitemoehybrid"), module="block_sparse_moe",
               count=_COUNT, per_expert=False, fused=("input_linear.weight", "output_linear.weight"),
               router=("router.layer.weight",), routing="top-k of the logits, softmax over those k",
               renormalize_field=None)
GRANITE_SWA = _moe("granitemoe_swa", ("granitemoe_swa",), module="block_sparse_moe", count=_COUNT, per_expert=False,
                   fused=_FUSED_PROJ, router=("router.weight",), routing="top-k of the logits, softmax over those k",
                   renormalize_field=None)

LAYOUTS: tuple[Layout, ...] = (GPT_OSS, QWEN3_MOE, QWEN2_MOE, MIXTRAL, OLMOE, DEEPSEEK_V3, PER_EXPERT_GATE,
                               PER_EXPERT_CORRECTED, PER_EXPERT_GATE_BIAS, PER_EXPERT_MODULE_BIAS, LAGUNA, ERNIE,
                               ROUTER_GATE, HUNYUAN, KOLIBRI, INKLING2, GEMMA4, LFM2, KIMI_LINEAR, MINIMAX, JAMBA, NEMOTRON_H, FUSED_GATE,
                               FUSED_CORRECTED, LLAMA4, ARIA, GRANITE, GRANITE_SWA)

#: Model types of MoE families whose experts cannot be pruned by dropping them without changing
#: what the model computes, with the reason (shown by ``inspect`` and every command that opens one).
REFUSED: dict[str, str] = {
    "deepseek_v4": "some layers route by a token-id hash table (ffn.gate.tid2eid maps token ids to expert ids), "
                   "so removing an expert changes those layers' choice for every token hashed to it",
    "doge": "its experts are product-key rows of an embedding (retrieval over num_experts keys), not modules that "
            "can be dropped one by one",
    "jetmoe": "one count (num_local_experts) sizes both its MLP experts and its attention experts; pruning one set "
              "would need the other pruned with the same keep set, which is not proven here",
    "longcat_flash": "its router has rows for zero-compute experts after the real ones (n_routed_experts + "
                     "zero_expert_num), which a keep set over real experts cannot renumber",
    "inkling_text": "its router has rows for sink experts beyond n_routed_experts, which a keep set over real "
                    "experts cannot renumber",
    "ergo": "its router weight is stored [hidden, experts] (feed_forward.gate_kernel), so one expert is not one "
            "contiguous row range",
    "zaya": "its router is a small MLP whose output has a row per expert plus one (balancing_biases [E+1]), so "
            "the kept experts cannot be renumbered by slicing rows",
    "gemma4_assistant": "it is not an MoE model: its config requires text_config.enable_moe_block false (a dense "
                        "drafter that proposes tokens for a Gemma-4 model), so it has no experts to prune",
    "dbrx": "its expert weights are flattened into dim 0 ([experts x intermediate, hidden]) and its count sits in "
            "ffn_config.moe_num_experts, a nested field",
}
