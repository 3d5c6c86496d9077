"""Synthetic per-expert MoE checkpoints at the published geometry of the largest public MoE models
(DeepSeek-V3/R1, Kimi-K2, Qwen3-235B-A22B, Qwen3-Coder-480B-A35B, GLM-4.5), without downloads.

Tensor names, dtypes and shapes follow each release's ``model.safetensors.index.json``; FP8
releases store every linear weight but the router as F8_E4M3 with an F32 ``weight_scale_inv`` of
one value per 128x128 block. Where each number comes from is in ``docs/geometries.md``.

Example:
    >>> from rewriter.tools.synth_moe import MOE_PRESETS, all_tensors
    >>> len(all_tensors(MOE_PRESETS["deepseek-v3"]))
    91991
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

from core.format import nbytes_of

Item = tuple[str, str, tuple[int, ...]]
_FP8_BLOCK = 128


@dataclass(frozen=True)
class MoEGeometry:
    """A per-expert MoE model (``mlp.experts.N.{gate,up,down}_proj``) and how it is sharded.

    ``mla`` is ``(q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)`` for
    multi-head latent attention (DeepSeek-V3 architecture), ``None`` for grouped-query attention.
    ``shard_bytes`` > 0: greedy fill in index order up to that many bytes; 0: one shard per layer
    (the global tensors in a shard of their own after the layers when ``globals_alone``, else in
    the first and last layer's shards).
    """

    model_type: str
    num_layers: int
    dense_layers: int
    mtp_layers: int
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    moe_intermediate: int
    shared_experts: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    shard_bytes: int
    fp8: bool = False
    mla: tuple[int, int, int, int, int] | None = None
    n_group: int = 1
    topk_group: int = 1
    qk_norm: bool = False
    attention_bias: bool = False
    globals_alone: bool = False
    fields: tuple[tuple[str, object], ...] = ()

    @property
    def family(self) -> str:
        return self.model_type

    def with_layers(self, n: int) -> MoEGeometry:
        """The same per-layer geometry with ``n`` decoder layers: dense-first layers kept while
        one MoE layer remains, MTP layers kept (numbered from ``n``)."""
        return dataclasses.replace(self, num_layers=n, dense_layers=min(self.dense_layers, max(n - 1, 0)))


def _linear(name: str, out: int, inp: int, fp8: bool) -> list[Item]:
    if not fp8:
        return [(name + ".weight", "BF16", (out, inp))]
    grid = (math.ceil(out / _FP8_BLOCK), math.ceil(inp / _FP8_BLOCK))
    return [(name + ".weight", "F8_E4M3", (out, inp)), (name + ".weight_scale_inv", "F32", grid)]


def _attention(g: MoEGeometry, p: str) -> list[Item]:
    H = g.hidden
    a = p + "self_attn."
    if g.mla:
        q_lora, kv_lora, nope, rope, v = g.mla
        return [*_linear(a + "q_a_proj", q_lora, H, g.fp8), (a + "q_a_layernorm.weight", "BF16", (q_lora,)),
                *_linear(a + "q_b_proj", g.num_heads * (nope + rope), q_lora, g.fp8),
                *_linear(a + "kv_a_proj_with_mqa", kv_lora + rope, H, g.fp8),
                (a + "kv_a_layernorm.weight", "BF16", (kv_lora,)),
                *_linear(a + "kv_b_proj", g.num_heads * (nope + v), kv_lora, g.fp8),
                *_linear(a + "o_proj", H, g.num_heads * v, g.fp8)]
    q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    out = []
    for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        out += _linear(a + proj, rows, H, g.fp8)
        if g.attention_bias:
            out.append((a + proj + ".bias", "BF16", (rows,)))
    out += _linear(a + "o_proj", H, q, g.fp8)
    if g.qk_norm:
        out += [(a + "q_norm.weight", "BF16", (g.head_dim,)), (a + "k_norm.weight", "BF16", (g.head_dim,))]
    return out


def _mlp(g: MoEGeometry, prefix: str, inter: int) -> list[Item]:
    return [*_linear(prefix + "gate_proj", inter, g.hidden, g.fp8), *_linear(prefix + "up_proj", inter, g.hidden, g.fp8),
            *_linear(prefix + "down_proj", g.hidden, inter, g.fp8)]


def layer_tensors(g: MoEGeometry, layer: int) -> list[Item]:
    """One decoder (or MTP) layer's tensors in module order."""
    p = f"model.layers.{layer}."
    H = g.hidden
    out = [(p + "input_layernorm.weight", "BF16", (H,)), *_attention(g, p)]
    if layer < g.dense_layers:
        out += _mlp(g, p + "mlp.", g.intermediate)
    else:
        out.append((p + "mlp.gate.weight", "BF16", (g.num_experts, H)))
        if g.model_type != "qwen3_moe":
            out.append((p + "mlp.gate.e_score_correction_bias", "F32", (g.num_experts,)))
        for e in range(g.num_experts):
            out += _mlp(g, f"{p}mlp.experts.{e}.", g.moe_intermediate)
        if g.shared_experts:
            out += _mlp(g, p + "mlp.shared_experts.", g.shared_experts * g.moe_intermediate)
    out.append((p + "post_attention_layernorm.weight", "BF16", (H,)))
    if layer >= g.num_layers:  # an MTP module: its own norms and projection, copies of embed and head
        out += [(p + "enorm.weight", "BF16", (H,)), (p + "hnorm.weight", "BF16", (H,)),
                (p + "eh_proj.weight", "BF16", (H, 2 * H)), (p + "shared_head.norm.weight", "BF16", (H,)),
                (p + "embed_tokens.weight", "BF16", (g.vocab, H)), (p + "shared_head.head.weight", "BF16", (g.vocab, H))]
    return out


def _globals(g: MoEGeometry) -> tuple[list[Item], list[Item]]:
    """The tensors before the layers (embedding) and after them (final norm, output head)."""
    return ([("model.embed_tokens.weight", "BF16", (g.vocab, g.hidden))],
            [("model.norm.weight", "BF16", (g.hidden,)), ("lm_head.weight", "BF16", (g.vocab, g.hidden))])


def all_tensors(g: MoEGeometry) -> list[Item]:
    """Every tensor in index order: embedding, layers in numeric order (MTP last), norm, head."""
    first, last = _globals(g)
    out = list(first)
    for layer in range(g.num_layers + g.mtp_layers):
        out += layer_tensors(g, layer)
    return out + last


def fill_shards(items: Iterable[Item], limit: int) -> list[list[Item]]:
    """Tensors in order, greedily into groups of at most ``limit`` bytes of data (a larger tensor alone)."""
    groups: list[list[Item]] = [[]]
    size = 0
    for item in items:
        n = nbytes_of(item[1], item[2])
        if size + n > limit and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups


def shard_assignment(g: MoEGeometry) -> dict[str, list[Item]]:
    """Shards as the release lays them out, named ``model-00001-of-0000N`` (one-based)."""
    first, last = _globals(g)
    if g.shard_bytes == 0:
        layers = [layer_tensors(g, i) for i in range(g.num_layers + g.mtp_layers)]
        if g.globals_alone:
            groups = layers + [first + last]
        else:
            groups = [first + layers[0], *layers[1:]]
            groups[-1] = groups[-1] + last
    else:
        groups = fill_shards(all_tensors(g), g.shard_bytes)
    # DeepSeek and Kimi name the count with six digits (model-00001-of-000163), others with five.
    width = 6 if g.mla else 5
    return {f"model-{i + 1:05d}-of-{len(groups):0{width}d}.safetensors": grp for i, grp in enumerate(groups)}


_ARCH = {"deepseek_v3": "DeepseekV3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}


def config_for(g: MoEGeometry) -> dict:
    """The release's ``config.json`` fields that shape the weights, for this geometry."""
    cfg: dict = {
        "architectures": [_ARCH[g.model_type]], "model_type": g.model_type, "hidden_size": g.hidden,
        "intermediate_size": g.intermediate, "moe_intermediate_size": g.moe_intermediate,
        "num_hidden_layers": g.num_layers, "num_attention_heads": g.num_heads,
        "num_key_value_heads": g.num_kv_heads, "num_experts_per_tok": g.top_k, "vocab_size": g.vocab,
        "hidden_act": "silu", "rms_norm_eps": 1e-06, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "norm_topk_prob": True, "bos_token_id": 0, "eos_token_id": 1,
        "torch_dtype": "bfloat16", "use_cache": True,
    }
    if g.model_type == "qwen3_moe":
        cfg.update(num_experts=g.num_experts, head_dim=g.head_dim, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        cfg.update(n_routed_experts=g.num_experts, n_shared_experts=g.shared_experts, n_group=g.n_group,
                   topk_group=g.topk_group, first_k_dense_replace=g.dense_layers, routed_scaling_factor=2.5,
                   num_nextn_predict_layers=g.mtp_layers, scoring_func="sigmoid", topk_method="noaux_tc")
    if g.mla:
        q_lora, kv_lora, nope, rope, v = g.mla
        cfg.update(q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                   v_head_dim=v)
    if g.model_type == "glm4_moe":
        cfg.update(head_dim=g.head_dim, attention_bias=g.attention_bias, use_qk_norm=g.qk_norm,
                   partial_rotary_factor=0.5)
    if g.fp8:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [_FP8_BLOCK, _FP8_BLOCK]}
    cfg.update(dict(g.fields))
    return cfg


def _deepseek(**kw) -> MoEGeometry:
    """DeepSeek-V3 architecture: MLA (q_lora 1536, kv_lora 512, heads of 128+64 / 128), hidden
    7168, dense intermediate 18432, experts of 2048, one shared expert, top-8, FP8 weights."""
    base = dict(model_type="deepseek_v3", num_layers=61, dense_layers=3, mtp_layers=1, num_experts=256, top_k=8,
                hidden=7168, intermediate=18432, moe_intermediate=2048, shared_experts=1, vocab=129280,
                num_heads=128, num_kv_heads=128, head_dim=128, shard_bytes=4_250_000_000, fp8=True,
                mla=(1536, 512, 128, 64, 128), n_group=8, topk_group=4)
    return MoEGeometry(**{**base, **kw})  # type: ignore[arg-type]


#: The published geometries (sources: docs/geometries.md) and scaled-down ones for tests.
MOE_PRESETS: dict[str, MoEGeometry] = {
    "deepseek-v3": _deepseek(),
    "deepseek-r1": _deepseek(),
    "kimi-k2": _deepseek(num_layers=61, dense_layers=1, mtp_layers=0, num_experts=384, vocab=163840, num_heads=64,
                         num_kv_heads=64, n_group=1, topk_group=1, shard_bytes=0, globals_alone=True,
                         fields=(("rope_theta", 50000.0), ("routed_scaling_factor", 2.827))),
    "qwen3-235b": MoEGeometry("qwen3_moe", 94, 0, 0, 128, 8, 4096, 12288, 1536, 0, 151936, 64, 4, 128,
                              shard_bytes=4_000_000_000, qk_norm=True),
    "qwen3-coder-480b": MoEGeometry("qwen3_moe", 62, 0, 0, 160, 8, 6144, 8192, 2560, 0, 151936, 96, 8, 128,
                                    shard_bytes=4_000_000_000, qk_norm=True),
    "glm-4.5": MoEGeometry("glm4_moe", 92, 3, 1, 160, 8, 5120, 12288, 1536, 1, 151552, 96, 8, 128, shard_bytes=0,
                           qk_norm=True, attention_bias=True),
    # DeepSeek-V3 architecture at test size: thousands of tensors in a few MB.
    "deepseek-v3-mini": _deepseek(num_layers=4, dense_layers=1, num_experts=128, hidden=64, intermediate=96,
                                  moe_intermediate=32, vocab=256, num_heads=4, num_kv_heads=4,
                                  mla=(32, 32, 16, 8, 16), n_group=8, topk_group=4, shard_bytes=1_500_000),
}
