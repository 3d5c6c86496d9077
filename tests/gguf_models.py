"""Tiny GGUF models written with llama.cpp's own ``gguf`` package, loadable by llama.cpp.

Weights are random (seeded); the metadata is what llama.cpp's loader reads for each
architecture. A byte-level GPT-2 vocabulary (256 bytes and a few merges) lets llama.cpp build its tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Geometry:
    layers: int = 2
    experts: int = 8
    top_k: int = 2
    hidden: int = 64
    expert_ff: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    vocab: int = 260


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode mapping: one printable character per byte value."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _vocab(w, g: Geometry) -> None:
    """256 byte tokens, then merged pairs of letters (llama.cpp needs at least one merge)."""
    pairs = [(chr(a), chr(a + 1)) for a in range(ord("a"), ord("z"), 2)][: g.vocab - 256]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_byte_tokens() + [a + b for a, b in pairs])
    w.add_token_types([1] * g.vocab)
    w.add_token_merges([f"{a} {b}" for a, b in pairs])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def _common(w, g: Geometry, experts: int | None = None, key_length: int | None = None) -> None:
    w.add_context_length(256)
    w.add_embedding_length(g.hidden)
    w.add_block_count(g.layers)
    w.add_feed_forward_length(g.expert_ff)
    w.add_head_count(g.heads)
    w.add_head_count_kv(g.kv_heads)
    w.add_key_length(key_length or g.head_dim)
    w.add_value_length(g.head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(experts or g.experts)
    w.add_expert_used_count(g.top_k)
    w.add_expert_feed_forward_length(g.expert_ff)


#: Architectures whose tiny models :func:`write_gguf` writes (``llama`` with experts is Mixtral's).
ARCHES = ("qwen3moe", "qwen2moe", "olmoe", "llama", "gpt-oss", "deepseek2", "glm4moe")

#: DeepSeek-V3's attention in small: each head's key is a part without position (``head_dim``)
#: and a rotated part (:data:`ROPE`); queries and keys/values pass through low-rank projections.
ROPE, Q_LORA, KV_LORA = 8, 32, 32

#: The grouped architectures' tiny models: a dense first layer, then MoE layers with one shared
#: expert and a selection bias; deepseek2 routes within 2 of 4 groups, glm4moe has one more
#: layer, the multi-token-prediction one (llama.cpp loads it but does not run it).
GROUPED = Geometry(layers=3, experts=16, top_k=2, hidden=64, expert_ff=32, heads=4, kv_heads=4, head_dim=16)


def moe_tensors(arch: str, g: Geometry, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of a Qwen3-MoE, Qwen2-MoE, OLMoE or Mixtral model in llama.cpp's names,
    row-major shapes, F32."""
    rng = np.random.default_rng(seed)

    def r(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    q, kv = g.heads * g.head_dim, g.kv_heads * g.head_dim
    out = {"token_embd.weight": r(g.vocab, g.hidden, scale=0.5)}
    for i in range(g.layers):
        p = f"blk.{i}."
        out.update({
            p + "attn_norm.weight": 1 + r(g.hidden), p + "attn_q.weight": r(q, g.hidden),
            p + "attn_k.weight": r(kv, g.hidden), p + "attn_v.weight": r(kv, g.hidden),
            p + "attn_output.weight": r(g.hidden, q), p + "ffn_norm.weight": 1 + r(g.hidden),
            p + "ffn_gate_inp.weight": r(g.experts, g.hidden, scale=0.5),
            p + "ffn_gate_exps.weight": r(g.experts, g.expert_ff, g.hidden),
            p + "ffn_up_exps.weight": r(g.experts, g.expert_ff, g.hidden),
            p + "ffn_down_exps.weight": r(g.experts, g.hidden, g.expert_ff),
        })
        if arch == "qwen3moe":
            out.update({p + "attn_q_norm.weight": 1 + r(g.head_dim), p + "attn_k_norm.weight": 1 + r(g.head_dim)})
        if arch == "olmoe":
            out.update({p + "attn_q_norm.weight": 1 + r(q), p + "attn_k_norm.weight": 1 + r(kv)})
        if arch == "qwen2moe":
            out.update({p + "attn_q.bias": r(q), p + "attn_k.bias": r(kv), p + "attn_v.bias": r(kv),
                        p + "ffn_gate_inp_shexp.weight": r(g.hidden), p + "ffn_gate_shexp.weight": r(g.expert_ff, g.hidden),
                        p + "ffn_up_shexp.weight": r(g.expert_ff, g.hidden), p + "ffn_down_shexp.weight": r(g.hidden, g.expert_ff)})
    out["output_norm.weight"] = 1 + r(g.hidden)
    out["output.weight"] = r(g.vocab, g.hidden, scale=0.3)
    return out


def _rand(seed: int):
    rng = np.random.default_rng(seed)

    def r(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    return r


def _grouped_ffn(r, g: Geometry, p: str, dense: bool) -> dict[str, np.ndarray]:
    """A dense layer's MLP, or a MoE layer's router, selection bias, experts and shared expert."""
    h, f = g.hidden, g.expert_ff
    if dense:
        return {p + "ffn_gate.weight": r(f, h), p + "ffn_up.weight": r(f, h), p + "ffn_down.weight": r(h, f)}
    return {p + "ffn_gate_inp.weight": r(g.experts, h, scale=0.5), p + "exp_probs_b.bias": r(g.experts, scale=0.3),
            p + "ffn_gate_exps.weight": r(g.experts, f, h), p + "ffn_up_exps.weight": r(g.experts, f, h),
            p + "ffn_down_exps.weight": r(g.experts, h, f), p + "ffn_gate_shexp.weight": r(f, h),
            p + "ffn_up_shexp.weight": r(f, h), p + "ffn_down_shexp.weight": r(h, f)}


def deepseek2_tensors(g: Geometry, seed: int = 0) -> dict[str, np.ndarray]:
    """DeepSeek-V3 in llama.cpp's names: low-rank (MLA) attention with the key/value up-projection
    ``attn_kv_b`` in one tensor, as llama.cpp reads it without ``key_length_mla``."""
    r, h, n = _rand(seed), g.hidden, g.heads
    out = {"token_embd.weight": r(g.vocab, h, scale=0.5)}
    for i in range(g.layers):
        p = f"blk.{i}."
        out.update({
            p + "attn_norm.weight": 1 + r(h), p + "attn_q_a_norm.weight": 1 + r(Q_LORA),
            p + "attn_kv_a_norm.weight": 1 + r(KV_LORA), p + "attn_q_a.weight": r(Q_LORA, h),
            p + "attn_q_b.weight": r(n * (g.head_dim + ROPE), Q_LORA, scale=0.2),
            p + "attn_kv_a_mqa.weight": r(KV_LORA + ROPE, h),
            p + "attn_kv_b.weight": r(n * 2 * g.head_dim, KV_LORA, scale=0.2),
            p + "attn_output.weight": r(h, n * g.head_dim), p + "ffn_norm.weight": 1 + r(h),
            **_grouped_ffn(r, g, p, dense=i == 0),
        })
    out["output_norm.weight"] = 1 + r(h)
    out["output.weight"] = r(g.vocab, h, scale=0.3)
    return out


def glm4moe_tensors(g: Geometry, seed: int = 0) -> dict[str, np.ndarray]:
    """GLM-4.5 in llama.cpp's names: attention with biases, a norm after attention, and after the
    ``g.layers`` decoder layers one multi-token-prediction layer (``nextn.*``)."""
    r, h = _rand(seed), g.hidden
    q, kv = g.heads * g.head_dim, g.kv_heads * g.head_dim
    out = {"token_embd.weight": r(g.vocab, h, scale=0.5)}
    for i in range(g.layers + 1):
        p = f"blk.{i}."
        out.update({
            p + "attn_norm.weight": 1 + r(h), p + "attn_q.weight": r(q, h), p + "attn_q.bias": r(q),
            p + "attn_k.weight": r(kv, h), p + "attn_k.bias": r(kv), p + "attn_v.weight": r(kv, h),
            p + "attn_v.bias": r(kv), p + "attn_output.weight": r(h, q), p + "post_attention_norm.weight": 1 + r(h),
            **_grouped_ffn(r, g, p, dense=i == 0),
        })
    p = f"blk.{g.layers}."
    out.update({p + "nextn.eh_proj.weight": r(h, 2 * h), p + "nextn.enorm.weight": 1 + r(h),
                p + "nextn.hnorm.weight": 1 + r(h), p + "nextn.shared_head_norm.weight": 1 + r(h)})
    out["output_norm.weight"] = 1 + r(h)
    out["output.weight"] = r(g.vocab, h, scale=0.3)
    return out


def _grouped_metadata(w, arch: str, g: Geometry) -> None:
    import gguf

    w.add_expert_shared_count(1)
    w.add_leading_dense_block_count(1)
    w.add_expert_weights_scale(2.5)
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_rope_dimension_count(ROPE)
    if arch == "deepseek2":
        w.add_q_lora_rank(Q_LORA)
        w.add_kv_lora_rank(KV_LORA)
        w.add_expert_group_count(4)
        w.add_expert_group_used_count(2)
    else:
        w.add_nextn_predict_layers(1)


def model_tensors(arch: str, g: Geometry, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of a tiny ``arch`` model (one of :data:`ARCHES`), F32."""
    if arch == "gpt-oss":
        return gpt_oss_tensors(g, seed)
    if arch == "deepseek2":
        return deepseek2_tensors(g, seed)
    if arch == "glm4moe":
        return glm4moe_tensors(g, seed)
    return moe_tensors(arch, g, seed)


def qwen3moe_tensors(g: Geometry, seed: int = 0) -> dict[str, np.ndarray]:
    return moe_tensors("qwen3moe", g, seed)


def gpt_oss_tensors(g: Geometry, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of a gpt-oss model in llama.cpp's names (biases, sinks), F32."""
    rng = np.random.default_rng(seed)

    def r(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    q, kv = g.heads * g.head_dim, g.kv_heads * g.head_dim
    out = {"token_embd.weight": r(g.vocab, g.hidden, scale=0.5)}
    for i in range(g.layers):
        p = f"blk.{i}."
        out.update({
            p + "attn_norm.weight": 1 + r(g.hidden),
            p + "attn_q.weight": r(q, g.hidden), p + "attn_q.bias": r(q),
            p + "attn_k.weight": r(kv, g.hidden), p + "attn_k.bias": r(kv),
            p + "attn_v.weight": r(kv, g.hidden), p + "attn_v.bias": r(kv),
            p + "attn_output.weight": r(g.hidden, q), p + "attn_output.bias": r(g.hidden),
            p + "attn_sinks.weight": r(g.heads), p + "post_attention_norm.weight": 1 + r(g.hidden),
            p + "ffn_gate_inp.weight": r(g.experts, g.hidden, scale=0.5), p + "ffn_gate_inp.bias": r(g.experts),
            p + "ffn_gate_exps.weight": r(g.experts, g.expert_ff, g.hidden),
            p + "ffn_gate_exps.bias": r(g.experts, g.expert_ff),
            p + "ffn_up_exps.weight": r(g.experts, g.expert_ff, g.hidden),
            p + "ffn_up_exps.bias": r(g.experts, g.expert_ff),
            p + "ffn_down_exps.weight": r(g.experts, g.hidden, g.expert_ff),
            p + "ffn_down_exps.bias": r(g.experts, g.hidden),
        })
    out["output_norm.weight"] = 1 + r(g.hidden)
    out["output.weight"] = r(g.vocab, g.hidden, scale=0.3)
    return out


def write_gguf(path: Path, arch: str, g: Geometry = Geometry(), *, seed: int = 0, qtype: str = "F32",
               split_max_size: int = 0, tensors: Mapping[str, Any] | None = None,
               experts: int | None = None) -> Path:
    """Write a tiny model of ``arch`` (one of :data:`ARCHES`) to ``path``.

    ``qtype`` quantizes the 2-D and 3-D weight matrices with the ``gguf`` package's quantizer
    (``Q8_0``, ``Q4_0``, ``MXFP4``…); norms, biases and the router stay F32, as llama.cpp's
    converter keeps them; a ``tensors`` entry ``(array, ggml type)`` is written as it is.
    ``split_max_size`` writes llama.cpp-style splits; returns the first file.
    """
    import gguf

    if tensors is None:
        tensors = model_tensors(arch, g, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch, split_max_size=split_max_size)
    w.add_name(f"tiny-{arch}")
    if arch == "glm4moe":  # the MTP layer counts as a block
        g = Geometry(**{**g.__dict__, "layers": g.layers + 1})
    _common(w, g, experts, key_length=g.head_dim + ROPE if arch == "deepseek2" else None)
    if arch in ("deepseek2", "glm4moe"):
        _grouped_metadata(w, arch, g)
    elif arch == "gpt-oss":
        w.add_sliding_window(128)
    elif arch == "qwen3moe":
        w.add_expert_weights_norm(True)
    elif arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(g.expert_ff)
    _vocab(w, g)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, arr in tensors.items():
        if isinstance(arr, tuple):  # already encoded: (bytes or values, ggml type), written as they are
            w.add_tensor(name, arr[0], raw_dtype=arr[1])
            continue
        routed = "gate_inp" not in name and "norm" not in name and "sinks" not in name
        if kind != gguf.GGMLQuantizationType.F32 and arr.ndim >= 2 and name.endswith(".weight") and routed:
            w.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_size:
        first = sorted(path.parent.glob(path.stem + "-00001-of-*.gguf"))
        return first[0]
    return path
