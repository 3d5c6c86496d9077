"""Every MoE model type of the installed transformers, found by walking transformers itself, and
a tiny random model of each built from its own config and model classes."""

from __future__ import annotations

import importlib
import inspect
import re
from functools import lru_cache
from typing import Any

#: A class of the modeling module whose name says it holds experts.
_MOE_CLASS = re.compile(r"(Experts|MoE|Moe|SparseMoe|Router)")
#: Config fields that state an expert count or top-k in some family.
_MOE_FIELD = re.compile(r"expert|moe")

SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, shared_expert_intermediate_size=48,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, first_k_dense_replace=1,
             n_group=2, topk_group=1, num_expert_group=2, topk_group_count=1, norm_topk_prob=True)
COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOPK_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "top_k_experts")
NUM_EXPERTS, TOP_K = 8, 2

#: Per model type: fields whose generic tiny value does not build (values the config validates).
OVERRIDES: dict[str, dict[str, Any]] = {
    "dots1": dict(n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2),
    "dots3_note_text": dict(num_key_value_heads=4, head_dim=16, index_head_dim=16, index_n_heads=2, index_topk=8),
    # Hybrid stacks: an attention layer among the three, so the model runs at this depth.
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16,
                             layer_types=["mamba", "attention", "mamba"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, mamba_d_state=8, mamba_dt_rank=8),
    "kolibri1_1": dict(index_layers=[1], head_dim=16, index_num_heads=1, index_topk=8, index_pool_size=64,
                       index_compression=16),
    "qwen4_exp_text": dict(indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4, indexer_n_heads=2,
                           indexer_kv_heads=1, linear_key_head_dim=8, linear_value_head_dim=8),
    "zaya": dict(num_experts_per_tok=1),
    # Its per-layer input gate must not be 8 wide, or the truth test would take it for a router.
    "gemma4_text": dict(enable_moe_block=True, top_k_experts=2, num_experts=8, moe_intermediate_size=32,
                        hidden_size_per_layer_input=16),
    "flex_olmo": dict(pad_token_id=1, eos_token_id=2),
    "inkling2_text": dict(unpadded_vocab_size=128),
    "inkling2_loop_text": dict(unpadded_vocab_size=128),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
}


def _text_dict(d: dict[str, Any]) -> dict[str, Any]:
    nested = {f"{k}.{kk}": vv for k, v in d.items() if isinstance(v, dict) and k != "text_config"
              for kk, vv in v.items()}
    return {**d, **nested}


@lru_cache(maxsize=1)
def moe_model_types() -> tuple[str, ...]:
    """Text model types with a causal-LM class, an expert-count or top-k config field, and an
    experts, MoE or router class in their modeling module (composite configs are left to their
    ``*_text`` type)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if model_type not in transformers.CONFIG_MAPPING:
            continue
        cfg_cls = transformers.CONFIG_MAPPING[model_type]
        try:
            d = cfg_cls().to_dict()
        except Exception:  # defaults its own validation refuses: judge by the declared fields
            d = dict.fromkeys(getattr(cfg_cls, "__dataclass_fields__", None) or
                              inspect.signature(cfg_cls.__init__).parameters)
        if isinstance(d.get("text_config"), dict):
            continue
        if not any(_MOE_FIELD.search(k) for k in _text_dict(d)):
            continue
        lm_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
        if lm_cls is None:
            continue
        modeling = importlib.import_module(lm_cls.__module__)
        if any(_MOE_CLASS.search(name) for name, _ in inspect.getmembers(modeling, inspect.isclass)
               if getattr(_, "__module__", "") == modeling.__name__):
            found.append(model_type)
    return tuple(found)


@lru_cache(maxsize=1)
def unjudged_model_types() -> tuple[str, ...]:
    """Causal-LM types whose default config does not build and that :func:`moe_model_types` leaves
    out: their declared fields could not show experts, so each needs a description or a refusal."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(moe_model_types())):
        if model_type not in transformers.CONFIG_MAPPING:
            continue
        try:
            transformers.CONFIG_MAPPING[model_type]()
        except Exception:
            found.append(model_type)
    return tuple(found)


def tiny_config(model_type: str):
    """A tiny config of ``model_type``: 3 layers, hidden 32, 8 experts, top-2, vocab 128."""
    import transformers

    cls = transformers.CONFIG_MAPPING[model_type]
    d = cls().to_dict()
    kw: dict[str, Any] = {k: v for k, v in SIZES.items() if k in d}
    kw.update({k: NUM_EXPERTS for k in COUNT_FIELDS if k in d})
    kw.update({k: TOP_K for k in TOPK_FIELDS if k in d})
    for k, v in d.items():
        # Per-layer lists (layer types, MoE layer lists) shortened to the tiny depth.
        if isinstance(v, list) and len(v) > 3 and "layer" in k and all(isinstance(x, (str, int)) for x in v):
            kw[k] = _shortened(v)
    if "kv_lora_rank" in d:  # multi-head latent attention: its own head sizes
        # Low-rank queries only where the config requires them (an int, not None, by default).
        kw.update(q_lora_rank=None if d.get("q_lora_rank") is None else 16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                  num_key_value_heads=4)
    kw.update(OVERRIDES.get(model_type, {}))
    return cls(**kw)


def _shortened(values: list) -> list:
    """A per-layer list cut to 3 layers, keeping each kind of layer it has (an attention layer
    among linear-attention ones) where 3 allow."""
    kinds = list(dict.fromkeys(values))
    if len(kinds) == 1:
        return values[:3]
    return (values[:1] + [k for k in kinds if k != values[0]] + values[1:])[:3]


def build(model_type: str, path: str, seed: int = 0):
    """A tiny float32 model of ``model_type`` with spread-out routing, saved to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "expert" in name or "gate" in name or "router" in name or "linear" in name:
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                b.uniform_(0, 0.1)
    model.save_pretrained(path)
    return model
