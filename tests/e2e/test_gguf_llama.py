"""Truth from llama.cpp itself: GGUF models pruned by the CLI load and generate in llama.cpp, and
their logits are those of the original with the dropped experts made unselectable.

* gpt-oss: the structural prune against the soft prune (the dropped experts' router bias set so
  llama.cpp never selects them), both run by llama.cpp. Same weights, same arithmetic: equal up
  to float rounding.
* qwen3moe (no router bias): the pruned GGUF in llama.cpp against transformers'
  ``Qwen3MoeForCausalLM`` built from the source GGUF's weights, dequantized, with the kept experts
  sliced out here (not by the tool). F32: every position within 1e-4 of the largest logit.
  llama.cpp quantizes activations for quantized matrices, which can flip a near-tie in a token's
  top-k: there, 3 positions in 4 within the type's tolerance (and fewer than half of them close to
  the unpruned model).
* qwen2moe, olmoe, llama (Mixtral), qwen3moe, deepseek2 (DeepSeek-V3/Kimi-K2), glm4moe (GLM-4.5):
  the pruned file against a model the ``gguf`` package writes from scratch with only the kept
  experts, cut out of the source's tensors here (not by the tool) as they are encoded (F32, Q8_0,
  and llama.cpp's Q4_K_M): llama.cpp computes the same logits and generates the same tokens.
* deepseek2 and glm4moe: the structural prune against the soft prune (the dropped experts'
  selection bias ``exp_probs_b`` set so llama.cpp never selects them, within the same groups).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli
from tests.gguf_models import GROUPED, Geometry, write_gguf

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow

TOKENS = [5, 77, 120, 33, 200, 18, 64, 91, 150, 7, 42, 250]
#: Max |logit difference| at a position between llama.cpp and transformers, relative to the
#: largest |logit|, per weight type (llama.cpp runs quantized matrices against activations
#: quantized to 8 bits).
TOLERANCE = {"F32": 1e-4, "Q8_0": 4e-2, "Q4_K_M": 8e-2}


def llama_logits(path: Path) -> tuple[np.ndarray, list[int]]:
    """Logits at every position of :data:`TOKENS`, and 4 greedily generated tokens."""
    # An F32 KV cache: llama.cpp's default F16 cache would round what the reference keeps in F32.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                          n_threads=1, seed=0, type_k=0, type_v=0)
    llm.eval(TOKENS)
    logits = np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    llm.reset()
    generated = []
    for tok in llm.generate(TOKENS, temp=0.0, top_k=1):
        generated.append(int(tok))
        if len(generated) == 4:
            break
    llm.close()
    return logits, generated


def quantize(src: Path, dst: Path, ftype: int) -> Path:
    """Quantize with llama.cpp's own quantizer (``llama_model_quantize``)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0
    return dst


def prune(src: Path, dst: Path, sal: Path, *extra: str, soft: bool = False) -> dict[str, list[int]]:
    cli("soft-prune" if soft else "prune", src, dst, "--saliency", sal, "--keep-frac", "0.5", *extra)
    cli("verify", src, dst)
    return json.loads((dst / "pruning.json").read_text())["expert_mapping"]


def close_positions(got: np.ndarray, want: np.ndarray, rel: float) -> int:
    """Positions whose logits are all within ``rel`` x the largest |logit| of ``want``."""
    return int((np.abs(got - want).max(axis=1) <= rel * float(np.abs(want).max())).sum())


def assert_close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} x {scale:.3g}"



def assert_hard_equals_soft(src: Path, tmp_path: Path) -> None:
    """llama.cpp's logits and greedy tokens of ``tmp_path/hard`` equal ``tmp_path/soft``'s, and
    differ from the source's (the prune changed the model: the check can fail)."""
    hard, hard_gen = llama_logits(tmp_path / "hard" / "model.gguf")
    soft, soft_gen = llama_logits(tmp_path / "soft" / "model.gguf")
    full, _ = llama_logits(src)
    assert len(hard_gen) == 4 and hard_gen == soft_gen
    assert_close(hard, soft, 1e-5)
    assert np.abs(full - hard).max() > 1e-3

@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "MXFP4"])
def test_gpt_oss_pruned_equals_soft_pruned_in_llama_cpp(tmp_path, qtype):
    src = write_gguf(tmp_path / "src" / "model.gguf", "gpt-oss", qtype=qtype, seed=3)
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    prune(src, tmp_path / "hard", sal)
    prune(src, tmp_path / "soft", sal, soft=True)
    assert_hard_equals_soft(src, tmp_path)


def hf_reference(weights: dict[str, np.ndarray], g: Geometry, keep: dict[str, list[int]]) -> np.ndarray:
    """Logits of transformers' Qwen3-MoE on ``weights`` (llama.cpp names) with only ``keep``'s experts."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kept = len(next(iter(keep.values())))
    config = Qwen3MoeConfig(
        vocab_size=g.vocab, hidden_size=g.hidden, intermediate_size=g.expert_ff, moe_intermediate_size=g.expert_ff,
        num_hidden_layers=g.layers, num_attention_heads=g.heads, num_key_value_heads=g.kv_heads,
        head_dim=g.head_dim, num_experts=kept, num_experts_per_tok=g.top_k, norm_topk_prob=True,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=256)
    model = Qwen3MoeForCausalLM(config).float().eval()
    sd = {"model.embed_tokens.weight": weights["token_embd.weight"], "model.norm.weight": weights["output_norm.weight"],
          "lm_head.weight": weights["output.weight"]}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    for i in range(g.layers):
        ids = keep[str(i)]
        p, q = f"blk.{i}.", f"model.layers.{i}."
        sd.update({q + hf + ".weight": weights[p + ll + ".weight"] for ll, hf in names.items()})
        sd[q + "mlp.gate.weight"] = weights[p + "ffn_gate_inp.weight"][ids]
        sd[q + "mlp.experts.gate_up_proj"] = np.concatenate(
            [weights[p + "ffn_gate_exps.weight"][ids], weights[p + "ffn_up_exps.weight"][ids]], axis=1)
        sd[q + "mlp.experts.down_proj"] = weights[p + "ffn_down_exps.weight"][ids]
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()})
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double().numpy()


def dequantized(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        out[t.name] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
    return out


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K_M"])
def test_qwen3moe_pruned_in_llama_cpp_matches_transformers(tmp_path, qtype):
    # K-quants need rows of 256: a wider model for all three types.
    g = Geometry(hidden=256, expert_ff=256, heads=4, kv_heads=2, head_dim=64)
    src = write_gguf(tmp_path / "f32" / "model.gguf", "qwen3moe", g, seed=5)
    if qtype != "F32":
        ftype = {"Q8_0": 7, "Q4_K_M": 15}[qtype]
        src = quantize(src, (tmp_path / "q").mkdir() or tmp_path / "q" / "model.gguf", ftype)
        kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(src)).tensors if "_exps" in t.name}
        assert kinds & {"Q8_0", "Q4_K", "Q6_K", "Q5_K"}, kinds
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    keep = prune(src, tmp_path / "out", sal)
    got, generated = llama_logits(tmp_path / "out" / "model.gguf")
    assert len(generated) == 4
    weights = dequantized(src)
    want = hf_reference(weights, g, keep)
    unpruned = hf_reference(weights, g, {str(i): list(range(g.experts)) for i in range(g.layers)})
    within = close_positions(got, want, TOLERANCE[qtype])
    if qtype == "F32":
        assert within == len(TOKENS)
    else:
        # Quantized activations can flip a near-tie in some token's top-k (in the unpruned
        # model as much): three positions in four must agree.
        assert within >= 3 * len(TOKENS) // 4, within
    # The check can fail: the unpruned model is not what llama.cpp computed.
    assert close_positions(got, unpruned, TOLERANCE[qtype]) < len(TOKENS) // 2


#: Per-expert tensors and the router's rows: what a model with only the kept experts has fewer of.
_EXPERT_ROWS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_inp.weight",
                "exp_probs_b.bias")


def kept_only(src: Path, keep: dict[str, list[int]]) -> dict[str, tuple[np.ndarray, object]]:
    """The source's tensors as encoded (quantized blocks untouched) with only ``keep``'s experts of
    each layer, in ``keep``'s order."""
    out = {}
    for t in gguf.GGUFReader(str(src)).tensors:
        data = np.array(t.data)
        layer = t.name.split(".")[1] if t.name.startswith("blk.") else None
        if layer is not None and t.name.split(".", 2)[2] in _EXPERT_ROWS:
            data = data[keep[layer]]
        out[t.name] = (data, t.tensor_type)
    return out


def _source(tmp_path: Path, arch: str, qtype: str) -> tuple[Path, Geometry]:
    """A tiny ``arch`` model; Q4_K_M by llama.cpp's quantizer on a model wide enough for K-quant
    rows. OLMoE's loader wants as many key/value heads as query heads."""
    g = GROUPED if arch in ("deepseek2", "glm4moe") else Geometry(kv_heads=4 if arch == "olmoe" else 2)
    if qtype == "Q4_K_M":  # qwen2moe's and olmoe's heads span the hidden width
        g = Geometry(**{**g.__dict__, "hidden": 256, "expert_ff": 256, "head_dim": g.head_dim if g is GROUPED else 64})
    src = write_gguf(tmp_path / "src" / "model.gguf", arch, g, qtype="F32" if qtype == "Q4_K_M" else qtype, seed=7)
    if qtype == "Q4_K_M":
        (tmp_path / "q").mkdir()
        src = quantize(src, tmp_path / "q" / "model.gguf", 15)
        kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(src)).tensors if "_exps" in t.name}
        assert kinds & {"Q4_K", "Q5_K", "Q6_K"}, kinds
    return src, g


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("arch", ["deepseek2", "glm4moe", "qwen3moe", "qwen2moe", "olmoe", "llama"])
def test_pruned_equals_a_model_written_with_only_the_kept_experts(tmp_path, arch, qtype):
    src, g = _source(tmp_path, arch, qtype)
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    keep = prune(src, tmp_path / "out", sal)
    kept = len(next(iter(keep.values())))
    assert kept == g.experts // 2 and all(len(ids) == kept for ids in keep.values())
    scratch = write_gguf(tmp_path / "scratch" / "model.gguf", arch, g, tensors=kept_only(src, keep), experts=kept)
    got, generated = llama_logits(tmp_path / "out" / "model.gguf")
    want, want_generated = llama_logits(scratch)
    assert len(generated) == 4 and generated == want_generated
    assert_close(got, want, 1e-6)
    full, _ = llama_logits(src)
    assert np.abs(full - got).max() > 1e-3  # the prune changed the model: the check can fail


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", ["deepseek2", "glm4moe"])
def test_grouped_pruned_equals_soft_pruned_in_llama_cpp(tmp_path, arch, qtype):
    src = write_gguf(tmp_path / "src" / "model.gguf", arch, GROUPED, qtype=qtype, seed=11)
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    keep = prune(src, tmp_path / "hard", sal)
    if arch == "deepseek2":  # two kept in each of the 4 groups of 4: group-limited routing unchanged
        assert all(sorted(e // 4 for e in ids) == [0, 0, 1, 1, 2, 2, 3, 3] for ids in keep.values())
    prune(src, tmp_path / "soft", sal, soft=True)
    assert_hard_equals_soft(src, tmp_path)
