"""Serving targets: the rules inference engines apply to a MoE checkpoint's expert count.

Each target (``vllm``, ``sglang``, ``trtllm``, ``llamacpp``, ``transformers``) is a small set of
rules, each with the engine file or issue it comes from (``docs/serving.md`` lists them). A rule
looks only at :class:`ServingFacts` — the config and the tensor headers — so the same rules judge
any checkpoint (``rewriter check``) and a plan's output before it is written (``plan``/``prune``
with ``--target``).

Verdicts: ``fail`` (the engine refuses to load or run it), ``warn`` (it loads, with a caveat the
message names), ``pass``, and ``skip`` (the rule does not apply to this checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from core.errors import PolicyError, count
from planners.serving_facts import COUNT_FIELDS, TOPK_FIELDS, ServingFacts, is_int

TARGETS = ("vllm", "sglang", "trtllm", "llamacpp", "transformers")


#: vLLM's fused top-k softmax kernel has instantiations for these counts; others take a slower
#: two-kernel path (``csrc/moe/topk_softmax_kernels.cu``).
VLLM_TOPK_SOFTMAX_FAST = frozenset({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 192, 320, 384, 448, 576})
#: FlashInfer / TensorRT-LLM-gen MoE routing kernel limits.
TRTLLM_MAX_EXPERTS = 512
TRTLLM_MAX_TOP_K = 10
#: ``LLAMA_MAX_EXPERTS`` in llama.cpp's ``src/llama-hparams.h``.
LLAMACPP_MAX_EXPERTS = 512


@dataclass(frozen=True)
class Verdict:
    target: str
    rule: str
    status: str  # pass | warn | fail | skip
    message: str
    source: str

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


Check = Callable[[ServingFacts, str, "int | None"], "tuple[str, str]"]


@dataclass(frozen=True)
class Rule:
    """One rule: its id, the targets it applies to, what it checks, and where it comes from."""

    id: str
    targets: tuple[str, ...]
    summary: str
    check: Check
    sources: Mapping[str, str]


# --- the rules ---------------------------------------------------------------------------------

def _uniform(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    if not f.layer_counts:
        return "fail", "no MoE layer found: no expert or router tensor matched the family's layout"
    if len(f.counts) > 1:
        by_count: dict[int, list[int]] = {}
        for layer, n in f.layer_counts.items():
            by_count.setdefault(n, []).append(layer)
        shown = "; ".join(f"{n} in layers {_short(v)}" for n, v in sorted(by_count.items()))
        return "fail", f"expert counts differ between layers ({shown}); the engine builds every layer with one count"
    return "pass", f"{f.count} experts in each of {len(f.layer_counts)} MoE layers"


def _short(v: Sequence[int]) -> str:
    return ",".join(map(str, v[:6])) + (",…" if len(v) > 6 else "")


def _count_fields(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    if len(f.counts) > 1:
        return "skip", "expert counts differ between layers (see the uniform rule); no one count to compare"
    if not f.count_fields:
        return "fail", f"{f.config_name} has none of {', '.join(COUNT_FIELDS)}; the engine cannot size the expert layers"
    # A per-layer list (Hunyuan) agrees when every entry is the count.
    bad = {k: v for k, v in f.count_fields.items() if v != f.count and not (isinstance(v, list) and v == [f.count] * len(v))}
    if bad:
        shown = ", ".join(f"{k} = {v!r}" for k, v in bad.items())
        return "fail", (f"{f.config_name} says {shown}, but the tensors hold {f.count} experts per layer; "
                        f"set every expert-count field to {f.count}")
    return "pass", ", ".join(f"{k} = {v}" for k, v in f.count_fields.items())


def _topk_fields(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    if not f.topk_fields:
        return "fail", f"{f.config_name} has none of {', '.join(TOPK_FIELDS)}: the routing top-k is unknown"
    values = set(map(repr, f.topk_fields.values()))
    if len(values) > 1 or f.top_k is None:
        shown = ", ".join(f"{k} = {v!r}" for k, v in f.topk_fields.items())
        return "fail", (f"{f.config_name}'s top-k fields disagree or are not positive integers ({shown}); "
                        f"make them one integer >= 1")
    return "pass", ", ".join(f"{k} = {v}" for k, v in f.topk_fields.items())


def _topk_le_count(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    k = f.top_k
    if k is None:
        return "skip", f"no top-k in {f.config_name} (see config-topk)"
    strict = target == "trtllm"
    n = f.fewest
    which = "" if len(f.counts) <= 1 else " in the smallest layer"
    if (n <= k) if strict else (n < k):
        need = "more than" if strict else "at least"
        return "fail", f"{n} experts per layer{which} with top-k {k}: keep {need} {k}, or lower the top-k"
    return "pass", f"{n} experts{which} {'>' if strict else '>='} top-k {k}"


def _group_fields_problem(f: ServingFacts) -> str | None:
    for name, v in ((f.group_field, f.n_group), ("topk_group", f.topk_group)):
        if v is not None and not (is_int(v) and v >= 1):
            return f"{f.config_name}'s {name} is {v!r}; expected an integer >= 1"
    return None


def _groups(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    if f.group_field is None:
        return "skip", f"{f.family} routes without expert groups"
    problem = _group_fields_problem(f)
    if problem:
        return "fail", problem
    g = f.n_group
    if g is None or g == 1:
        return "skip", f"no group-limited routing ({f.group_field} {'absent' if g is None else '= 1'})"
    if f.count % g:
        return "fail", f"{f.count} experts are not divisible by n_group = {g}; keep a multiple of {g}"
    per = f.count // g
    tg, k = f.topk_group, f.top_k
    if tg is not None and tg > g:
        return "fail", f"topk_group = {tg} is larger than n_group = {g}"
    if tg is not None and k is not None:
        reach = tg * per
        strict = target == "trtllm"
        if (reach <= k) if strict else (reach < k):
            return "fail", (f"{tg} groups of {per} experts reach {reach} experts, "
                            f"{'not more than' if strict else 'fewer than'} top-k {k}; keep more experts per group")
    return "pass", f"{g} groups of {per} experts" + (f", topk_group {tg}" if tg is not None else "")


def _flashinfer_routing(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    problems = []
    if f.count % 4:
        problems.append(f"{f.count} experts is not a multiple of 4")
    if f.count > TRTLLM_MAX_EXPERTS:
        problems.append(f"{f.count} experts exceeds {TRTLLM_MAX_EXPERTS}")
    if f.top_k is not None and f.top_k > TRTLLM_MAX_TOP_K:
        problems.append(f"top-k {f.top_k} exceeds {TRTLLM_MAX_TOP_K}")
    if not problems:
        return "pass", f"{f.count} experts: a multiple of 4, at most {TRTLLM_MAX_EXPERTS}"
    # vLLM picks these kernels for gpt-oss MXFP4 on Blackwell; elsewhere they are one backend of several.
    hard = target == "trtllm" or (target == "vllm" and f.family == "gpt_oss")
    return ("fail" if hard else "warn"), "; ".join(problems) + (
        "" if hard else " (only the FlashInfer TensorRT-LLM MoE backend rejects it; other backends load it)")


def _vllm_topk_softmax(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    if is_int(f.n_group) and f.n_group > 1:
        return "skip", "group-limited routing uses vLLM's grouped top-k, not the top-k softmax kernel"
    if f.count in VLLM_TOPK_SOFTMAX_FAST:
        return "pass", f"{f.count} experts has a fused top-k softmax kernel"
    return "warn", (f"{f.count} experts has no fused top-k softmax instantiation; vLLM falls back to its "
                    f"two-kernel softmax + top-k path (slower routing)")


def _expert_parallel(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    if ep is None or ep <= 1:
        return "skip", "no --ep given"
    if ep > f.count:
        return "fail", (f"--ep {ep} ranks for {f.count} experts per layer: {ep - f.count} ranks would hold no "
                        f"expert; use at most {f.count} ranks")
    if f.count % ep == 0:
        return "pass", f"{f.count} experts split into {ep} ranks of {f.count // ep}"
    base, rem = divmod(f.count, ep)
    if target == "vllm":
        return "warn", (f"{f.count} experts over {ep} ranks: vLLM gives the first {rem} ranks {base + 1} experts "
                        f"and the rest {base} (uneven load); EPLB needs an even split")
    return "fail", f"{f.count} experts are not divisible by --ep {ep}; keep a multiple of {ep}"


def _llamacpp_max(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    if f.count > LLAMACPP_MAX_EXPERTS:
        return "fail", f"{f.count} experts exceeds LLAMA_MAX_EXPERTS = {LLAMACPP_MAX_EXPERTS}"
    return "pass", f"{f.count} <= {LLAMACPP_MAX_EXPERTS}"


def _quantization(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    if f.quant_problem:
        return "fail", f.quant_problem
    if f.mxfp4_blocks and f.quant_method != "mxfp4":
        return "fail", ("expert weights are MXFP4 blocks/scales but config.json's quantization_config is "
                        f"{f.quant_method or 'missing'}; restore quantization_config with quant_method mxfp4")
    if f.quant_method == "mxfp4" and not f.mxfp4_blocks:
        return "fail", ("config.json declares quant_method mxfp4 but the expert weights are not MXFP4 "
                        "blocks/scales; drop quantization_config")
    fp8 = any(d.startswith("F8_") for d in f.expert_dtypes)
    if fp8 and f.quant_method not in ("fp8", "compressed-tensors", "fbgemm_fp8", "modelopt"):
        return "fail", (f"expert weights are {sorted(f.expert_dtypes)} but config.json's quantization_config is "
                        f"{f.quant_method or 'missing'}; restore the source's quantization_config")
    return "pass", f"quantization_config {f.quant_method or 'absent'} matches expert dtypes {sorted(f.expert_dtypes)}"


def _quant_modules(f: ServingFacts, target: str, ep: int | None) -> tuple[str, str]:
    if f.quant_method is None:
        return "skip", "no quantization_config"
    if f.quant_modules_problem:
        return "fail", f.quant_modules_problem
    return "pass", "every expert module quantization_config names exists, and its unquantized experts are excluded"


_ALL = TARGETS
_HF_CONFIG = "the Hugging Face config class of the family (transformers models/<family>/configuration_*.py)"

RULES: tuple[Rule, ...] = (
    Rule("uniform", _ALL, "every MoE layer has the same expert count", _uniform, {
        "vllm": "model files build every layer's FusedMoE with the one config count (global_num_experts)",
        "sglang": "python/sglang/srt/models/mixtral.py: MixtralMoE(num_experts=config.num_local_experts) in every layer",
        "trtllm": "tensorrt_llm/_torch/models: every layer's MoE gets num_experts=config.num_local_experts",
        "llamacpp": "src/llama-model.cpp load_hparams: one n_expert hyperparameter for all layers",
        "transformers": "modeling_<family>.py: expert parameters are shaped [num_experts, …] from the config; "
                        "a layer of another size fails to load (size mismatch)",
    }),
    Rule("config-count", _ALL, "every expert-count field in config.json (GGUF: its metadata) equals the tensors' count",
         _count_fields, {t: _HF_CONFIG + "; llama.cpp: convert_hf_to_gguf.py reads the first of num_local_experts, "
                         "num_experts, n_routed_experts" for t in _ALL}),
    Rule("config-topk", _ALL, "the top-k fields in config.json (GGUF: its metadata) are present and agree", _topk_fields,
         {t: _HF_CONFIG + "; llama.cpp: convert_hf_to_gguf.py reads num_experts_per_tok" for t in _ALL}),
    Rule("topk-le-count", _ALL, "kept experts >= top-k (TensorRT-LLM: > top-k)", _topk_le_count, {
        "vllm": "torch.topk over the router logits needs k <= experts",
        "sglang": "torch.topk over the router logits needs k <= experts",
        "trtllm": "cpp/tensorrt_llm/thop/fp8PerTensorScaleMoe.cpp: TORCH_CHECK(num_experts > top_k)",
        "llamacpp": "src/llama-model.cpp: GGML_ASSERT(hparams.n_expert_used <= hparams.n_expert)",
        "transformers": "torch.topk(router_logits, top_k) needs k <= experts",
    }),
    Rule("n-group", _ALL, "group-limited routing: count divisible by n_group, topk_group groups reach top-k",
         _groups, {
             "vllm": "vLLM grouped_topk (fused_moe): scores.view(num_token, num_expert_group, -1)",
             "sglang": "python/sglang/srt/layers/moe/topk.py grouped_topk: scores.view(num_token, num_expert_group, -1)",
             "trtllm": "cpp/tensorrt_llm/thop/fp8PerTensorScaleMoe.cpp: num_experts % n_group == 0, "
                       "topk_group <= n_group, top_k < topk_group * num_experts / n_group",
             "llamacpp": "src/llama-model.cpp: GGML_ASSERT(hparams.n_expert % hparams.n_expert_groups == 0)",
             "transformers": "modeling_deepseek_v3.py: scores_for_choice.view(-1, n_group, n_routed_experts // n_group)",
         }),
    Rule("flashinfer-routing", ("vllm", "sglang", "trtllm"),
         "FlashInfer / TensorRT-LLM-gen MoE routing: count a multiple of 4, at most 512; top-k at most 10",
         _flashinfer_routing, {
             "vllm": "vllm/model_executor/layers/quantization/mxfp4.py picks FlashInfer's TRT-LLM MoE for MXFP4 on "
                     "SM100; TrtLlmFp8Experts asserts global_num_experts % 4 == 0, <= 512, topk <= 10",
             "sglang": "unconfirmed for SGLang: applies when it runs FlashInfer's TRT-LLM MoE backend",
             "trtllm": "cpp/tensorrt_llm/thop/fp8PerTensorScaleMoe.cpp: 'Routing kernel expects that num_experts "
                       "must be divisible by 4'; FlashInfer routingRenormalize: num_experts <= 512, top-k <= 10",
         }),
    Rule("vllm-topk-softmax", ("vllm",), "a fused top-k softmax kernel exists for the count (speed, not loading)",
         _vllm_topk_softmax, {"vllm": "csrc/moe/topk_softmax_kernels.cu: cases 1..512 (powers of 2) and "
                                      "192, 320, 384, 448, 576; other counts take moeSoftmax + moeTopK"}),
    Rule("expert-parallel", ("vllm", "sglang", "trtllm", "transformers"), "--ep N: count divisible by N",
         _expert_parallel, {
             "vllm": "vllm/model_executor/layers/fused_moe/layer.py determine_expert_map: remainder to the first "
                     "ranks; EPLB asserts an even split",
             "sglang": "python/sglang/srt/layers/moe/fused_moe_triton/layer.py: assert num_experts % moe_ep_size == 0",
             "trtllm": "unconfirmed: treated as needing an even split",
             "transformers": "unconfirmed: treated as needing an even split",
         }),
    Rule("llamacpp-max-experts", ("llamacpp",), "at most 512 experts", _llamacpp_max,
         {"llamacpp": "src/llama-hparams.h: #define LLAMA_MAX_EXPERTS 512; src/llama-model.cpp: "
                      "GGML_ASSERT(hparams.n_expert <= LLAMA_MAX_EXPERTS)"}),
    Rule("quantization-config", _ALL, "quantization_config matches the expert tensors (MXFP4 kept for gpt-oss)",
         _quantization, {t: "the loader picks the MoE weight layout from config.json's quantization_config "
                            "(transformers Mxfp4HfQuantizer, vLLM Mxfp4Config)" for t in _ALL}),
    Rule("quantization-modules", _ALL, "expert modules named in quantization_config exist and match how they are "
         "stored", _quant_modules,
         {t: "compressed-tensors: modules not in `ignore` are loaded as quantized (weight_packed, weight_scale); "
             "transformers' quantizers skip `modules_to_not_convert`; vLLM skips `ignore` / `exclude_modules` "
             "(is_layer_skipped)" for t in _ALL}),
)


def check_facts(facts: ServingFacts, targets: Sequence[str], ep: int | None = None) -> list[Verdict]:
    """Every rule of every target, in target order."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise PolicyError(f"unknown serving target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    if ep is not None and ep < 1:
        raise PolicyError(f"--ep {ep} must be >= 1")
    out = []
    for t in targets:
        for rule in RULES:
            if t in rule.targets:
                status, msg = rule.check(facts, t, ep)
                out.append(Verdict(t, rule.id, status, msg, rule.sources[t]))
    return out


def failures(verdicts: Iterable[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.status == "fail"]


def format_verdicts(verdicts: Sequence[Verdict]) -> str:
    """A table: target, rule, verdict, detail; then a summary line."""
    rows = [("target", "rule", "verdict", "detail")]
    rows += [(v.target, v.rule, v.status.upper() if v.status == "fail" else v.status, v.message) for v in verdicts]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths)), r[3]]).rstrip() for r in rows]
    lines.insert(1, "  ".join(["-" * w for w in widths] + ["------"]))
    fails, warns = len(failures(verdicts)), sum(v.status == "warn" for v in verdicts)
    lines.append(f"\n{fails} failed, {count(warns, 'warning')} -> {'FAILED' if fails else 'OK'}")
    return "\n".join(lines)


# --- planning with targets -----------------------------------------------------------------------


