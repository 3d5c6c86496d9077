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
from typing import Any

from planners.plan import Plan
from planners.policies import KeepPolicy, keep_count
from planners.quantization import module_list_problem
from rewriter.core.checkpoint import Checkpoint
from rewriter.core.errors import PlanError, PolicyError, count
from rewriter.core.layouts import Layout

TARGETS = ("vllm", "sglang", "trtllm", "llamacpp", "transformers")

#: Expert-count and top-k fields any engine may read, in the order llama.cpp's converter
#: (``convert_hf_to_gguf.py``, ``TextModel.set_gguf_parameters``) looks for them.
COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
TOPK_FIELDS = ("num_experts_per_tok", "experts_per_token")

#: vLLM's fused top-k softmax kernel has instantiations for these counts; others take a slower
#: two-kernel path (``csrc/moe/topk_softmax_kernels.cu``).
VLLM_TOPK_SOFTMAX_FAST = frozenset({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 192, 320, 384, 448, 576})
#: FlashInfer / TensorRT-LLM-gen MoE routing kernel limits.
TRTLLM_MAX_EXPERTS = 512
TRTLLM_MAX_TOP_K = 10
#: ``LLAMA_MAX_EXPERTS`` in llama.cpp's ``src/llama-hparams.h``.
LLAMACPP_MAX_EXPERTS = 512


@dataclass(frozen=True)
class ServingFacts:
    """What the rules look at, from ``config.json`` and the tensor headers only.

    Attributes:
        family: the layout's family (``gpt_oss``, ``qwen3_moe``, …).
        layer_counts: experts per MoE layer, as the tensors hold them.
        count_fields / topk_fields: the family's count / top-k fields and those of
            :data:`COUNT_FIELDS` / :data:`TOPK_FIELDS` present in the config, with their values.
        group_field: the family's config field of group-limited routing (``None``: the family
            routes without groups, whatever its config says).
        n_group / topk_group: group-limited routing (DeepSeek-V3, GLM-4.5) as the config holds
            them (``None`` when absent; any other value is judged by the ``n-group`` rule).
        quant_method: ``quantization_config.quant_method`` of the config, if any.
        quant_problem: what is wrong with a ``quantization_config`` that is not an object with a
            string ``quant_method`` (``None`` when absent or well-formed).
        expert_dtypes: dtypes of the expert tensors (``U8`` blocks for MXFP4, ``F8_E4M3`` …).
        mxfp4_blocks: whether the expert weights are MXFP4 ``*_blocks``/``*_scales`` tensors.
        quant_modules_problem: what disagrees between ``quantization_config``'s module lists
            and the per-expert tensors (:func:`planners.quantization.module_list_problem`).
        config_name: what messages call the config (``config.json``, or ``the GGUF metadata``).
    """

    family: str
    layer_counts: Mapping[int, int]
    count_fields: Mapping[str, Any]
    topk_fields: Mapping[str, Any]
    n_group: Any = None
    topk_group: Any = None
    quant_method: str | None = None
    quant_problem: str | None = None
    group_field: str | None = "n_group"
    expert_dtypes: frozenset[str] = frozenset()
    mxfp4_blocks: bool = False
    quant_modules_problem: str | None = None
    #: Where the fields are read: ``config.json``, or a GGUF model's metadata.
    config_name: str = "config.json"

    @property
    def counts(self) -> set[int]:
        return set(self.layer_counts.values())

    @property
    def count(self) -> int:
        """The per-layer expert count (the largest, when layers differ)."""
        return max(self.counts) if self.counts else 0

    @property
    def fewest(self) -> int:
        """The smallest per-layer expert count: the one the routing top-k must fit."""
        return min(self.counts) if self.counts else 0

    def count_text(self) -> str:
        """``32``, or ``15-19`` where layers differ."""
        return str(self.count) if len(self.counts) <= 1 else f"{self.fewest}-{self.count}"

    @property
    def top_k(self) -> int | None:
        """The routing top-k: the first positive integer field, or the largest entry of a per-layer
        list (Hunyuan's ``moe_topk``)."""
        ints = [v if _is_int(v) else max(v) for v in self.topk_fields.values()
                if (_is_int(v) and v > 0) or (isinstance(v, list) and v and all(_is_int(x) and x > 0 for x in v))]
        return ints[0] if ints else None

    def with_count(self, n: int) -> ServingFacts:
        """The same checkpoint with ``n`` experts in every layer and its count fields patched."""
        fields = {f: n for f in self.count_fields} or {"num_experts": n}
        return dataclasses.replace(self, layer_counts={k: n for k in self.layer_counts}, count_fields=fields)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _config_name(config: Mapping[str, Any]) -> str:
    # A GGUF model's config is its metadata, which always names its architecture.
    return "the GGUF metadata" if "general.architecture" in config else "config.json"


def facts_from(config: Mapping[str, Any], tensors: Iterable[tuple[str, str, Sequence[int]]],
               layout: Layout) -> ServingFacts:
    """Facts from a config and ``(name, dtype, shape)`` tensor headers (a checkpoint's or a plan's).

    Expert counts come from the tensors, not the config: dim 0 of fused and router tensors, the
    distinct expert ids of per-expert tensors.
    """
    rows: dict[int, set[int]] = {}
    ids: dict[int, set[int]] = {}
    dtypes, blocks = set(), False
    tensors = list(tensors)
    for name, dtype, shape in tensors:
        t = layout.classify(name)
        if t is None:
            continue
        if t.role == "expert":
            ids.setdefault(t.layer, set()).add(t.expert or 0)
            dtypes.add(dtype)
        elif shape:
            rows.setdefault(t.layer, set()).add(int(shape[0]))
            if t.role == "fused":
                dtypes.add(dtype)
                blocks = blocks or name.endswith(("_blocks", "_scales"))
    counts = {layer: max(v) for layer, v in rows.items()}
    for layer, v in ids.items():
        counts[layer] = len(v)
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    quant_problem = None
    if quant is not None and not (isinstance(quant, dict) and isinstance(method, str)):
        quant_problem = (f"{_config_name(config)}'s quantization_config is {quant!r:.60}; expected an object with a "
                         f"string quant_method (copy the source's quantization_config)")
        method = None
    grouped = layout.group_field is not None
    return ServingFacts(
        family=layout.family,
        layer_counts=dict(sorted(counts.items())),
        # The family's own fields (ERNIE's moe_num_experts / moe_k, Gemma-4's top_k_experts) are
        # what its config class, and so every engine's model file for it, reads.
        count_fields={f: config[f] for f in dict.fromkeys((*layout.count_fields, *COUNT_FIELDS)) if f in config},
        topk_fields={f: config[f] for f in dict.fromkeys((*layout.topk_fields, *TOPK_FIELDS)) if f in config},
        n_group=config.get(layout.group_field) if grouped and layout.group_field else None,
        topk_group=config.get(_topk_group_field(layout)) if grouped else None,
        quant_method=method,
        quant_problem=quant_problem,
        group_field=layout.group_field,
        config_name=_config_name(config),
        expert_dtypes=frozenset(dtypes),
        mxfp4_blocks=blocks,
        quant_modules_problem=module_list_problem(config, layout, tensors),
    )


def _topk_group_field(layout: Layout) -> str:
    """``topk_group``, or for a GGUF model its metadata key ``{arch}.expert_group_used_count``."""
    group = layout.group_field or ""
    return group.replace("expert_group_count", "expert_group_used_count") if group.endswith(".expert_group_count") else "topk_group"


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
        if v is not None and not (_is_int(v) and v >= 1):
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
    if _is_int(f.n_group) and f.n_group > 1:
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


def fit_count(facts: ServingFacts, wanted: int, total: int, targets: Sequence[str], ep: int | None,
              multiple: int = 1) -> int | None:
    """The count nearest to ``wanted`` (up first, on a tie) in ``1..total`` that every target accepts.

    With ``ep`` the count must also split evenly over the ranks, even for an engine that would
    only warn: asking for expert parallelism means asking for an even split. When ``wanted``
    prunes, keeping every expert (``total``) is suggested only when no smaller count passes.
    """
    candidates = sorted(range(1, total + 1),
                        key=lambda n: (n == total != wanted, abs(n - wanted), n < wanted))
    for n in candidates:
        if n % multiple or (ep and n % ep):
            continue
        if not failures(check_facts(facts.with_count(n), targets, ep)):
            return n
    return None


def refusal(verdicts: Sequence[Verdict], suggestion: int | None, ep: int | None = None,
            soft_count: int | None = None, multiple: int = 1) -> PlanError:
    """The error a plan refuses with: every failing rule, and what to do.

    ``soft_count``: the plan is a soft prune, which keeps all ``soft_count`` experts.
    """
    bad = failures(verdicts)
    lines = [f"  {v.target} {v.rule}: {v.message} ({v.source})" for v in bad]
    targets = list(dict.fromkeys(v.target for v in verdicts))
    if soft_count is not None:
        hint = (f"a soft prune keeps all {soft_count} experts, so the count cannot move: drop the --target "
                f"that rejects it, or prune structurally (prune) to a count it accepts")
    elif any(v.rule == "uniform" for v in bad):
        hint = ("these engines build every layer with one expert count: plan with --keep-n or --keep-frac "
                "instead of different counts per layer (--budget, a non-uniform keep list), or drop --target")
    elif suggestion is not None:
        hint = f"keep {suggestion} experts per layer (--keep-n {suggestion}), or pass --fit-targets to adjust the count"
    else:
        hint = _no_count_hint(targets, ep, multiple)
    return PlanError("the serving targets would reject this output:\n" + "\n".join(lines) + f"\n{hint}")


def _no_count_hint(targets: Sequence[str], ep: int | None, multiple: int) -> str:
    """What to do when no expert count passes: relax what narrows the counts tried, or the targets."""
    which = "every target" if len(targets) > 1 else targets[0]
    limits = {flag: v for flag, v in (("--ep", ep or 1), ("--keep-multiple", multiple)) if v > 1}
    if limits:
        given = " and ".join(f"{flag} {v}" for flag, v in limits.items())
        return (f"no expert count satisfies {which} together with {given}; change {' or '.join(limits)}"
                + (", or drop a --target" if len(targets) > 1 else ""))
    if len(targets) > 1:
        return "no expert count satisfies every target; drop a --target"
    return f"no expert count per layer satisfies {which}; fix the failing rules above, or drop --target {which}"


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

def with_top_k(facts: ServingFacts, k: int | None) -> ServingFacts:
    """The facts once the routing top-k is rewritten to ``k`` (``None``: unchanged)."""
    if k is None:
        return facts
    return dataclasses.replace(facts, topk_fields={f: k for f in facts.topk_fields} or {"num_experts_per_tok": k})


def fit_policy(policy: KeepPolicy, facts: ServingFacts, num_experts: int, top_k: int, targets: Sequence[str],
               ep: int | None) -> tuple[KeepPolicy, str | None]:
    """``--fit-targets``: move the policy's keep count to the nearest one every target accepts.

    Returns:
        The policy (with ``keep_n`` set when the count moved) and a sentence saying what moved and
        why, or ``None`` when the asked-for count already passes.

    Raises:
        PlanError: no count in ``1..num_experts`` passes every target.
    """
    n = keep_count(policy, num_experts, top_k)
    facts = with_top_k(facts, policy.top_k)
    fitted = fit_count(facts, n, num_experts, targets, ep, policy.keep_multiple)
    if fitted is None:
        raise refusal(check_facts(facts.with_count(n), targets, ep), None, ep, multiple=policy.keep_multiple)
    if fitted == n:
        return policy, None
    why = "; ".join(f"{v.target} {v.rule}: {v.message}" for v in failures(check_facts(facts.with_count(n), targets, ep)))
    note = f"--fit-targets: keeping {fitted} experts per layer instead of {n} ({why})"
    return dataclasses.replace(policy, keep_n=fitted, keep_frac=None), note


def plan_facts(plan: Plan, layout: Layout) -> ServingFacts:
    """Facts of a plan's output: its patched config and its output tensors' headers."""
    return facts_from(plan.config, ((t.name, t.dtype, t.shape) for o in plan.outputs for t in o.tensors), layout)


def apply_targets(plan: Plan, layout: Layout, targets: Sequence[str], ep: int | None) -> Plan:
    """Check a plan's output against ``targets``; refuse on a failure, else record the verdicts.

    The verdicts go into the plan's provenance (``serving``), so ``pruning.json`` and the model
    card say which targets were checked.

    Raises:
        PlanError: a target would reject the output; the message lists each failing rule and the
            nearest count every target accepts.
    """
    facts = plan_facts(plan, layout)
    verdicts = check_facts(facts, targets, ep)
    if failures(verdicts):
        total = int(plan.provenance.get("source_experts_per_layer") or facts.count)
        if plan.soft:
            raise refusal(verdicts, None, ep, soft_count=facts.count)
        raise refusal(verdicts, fit_count(facts, facts.count, total, targets, ep), ep)
    serving = {"targets": list(targets), "ep": ep, "verdicts": [v.to_json() for v in verdicts]}
    return dataclasses.replace(plan, provenance={**plan.provenance, "serving": serving})


def checkpoint_facts(ckpt: Checkpoint) -> ServingFacts:
    """Facts of an opened checkpoint (its family detected from the config)."""
    return facts_from(ckpt.config, ((t.name, t.dtype, t.shape) for t in ckpt.tensors.values()), ckpt.layout)
