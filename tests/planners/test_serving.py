"""Serving targets: every rule of every target on a passing and a failing checkpoint (built here,
real safetensors files), `rewriter check` on pruned outputs of each family, plans that refuse or
fit the count, and a 120B-geometry plan for vLLM with expert parallelism."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from core.format import encode_header, nbytes_of
from planners.serving import RULES, TARGETS
from rewriter.cli import main
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import cli

ARCH = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM",
        "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
COUNT_FIELD = {"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts", "glm4_moe": "n_routed_experts"}


def write_moe(path: Path, model_type: str, n: int, k: int, *, layers: int = 2, per_layer: dict[int, int] | None = None,
              expert_dtype: str = "BF16", config: dict | None = None) -> Path:
    """A per-expert MoE checkpoint (one model.safetensors over a hole) with real headers."""
    items: list[tuple[str, str, tuple[int, ...]]] = [("model.embed_tokens.weight", "BF16", (16, 8)),
                                                     ("model.norm.weight", "BF16", (8,))]
    for layer in range(layers):
        e = (per_layer or {}).get(layer, n)
        p = f"model.layers.{layer}."
        if model_type == "mixtral":
            items.append((p + "block_sparse_moe.gate.weight", "BF16", (e, 8)))
            items += [(p + f"block_sparse_moe.experts.{i}.{w}.weight", expert_dtype, (8, 8))
                      for i in range(e) for w in ("w1", "w2", "w3")]
            continue
        items.append((p + "mlp.gate.weight", "BF16", (e, 8)))
        items += [(p + f"mlp.experts.{i}.{w}_proj.weight", expert_dtype, (8, 8))
                  for i in range(e) for w in ("gate", "up", "down")]
        if model_type in ("deepseek_v3", "glm4_moe"):
            items += [(p + "mlp.gate.e_score_correction_bias", "F32", (e,)),
                      (p + "mlp.shared_experts.up_proj.weight", expert_dtype, (8, 8))]
        if model_type == "qwen2_moe":
            items += [(p + "mlp.shared_expert.up_proj.weight", "BF16", (8, 8)),
                      (p + "mlp.shared_expert_gate.weight", "BF16", (1, 8))]
    path.mkdir(parents=True)
    head = encode_header(items)
    with open(path / "model.safetensors", "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(nbytes_of(d, s) for _, d, s in items))
    cfg = {"model_type": model_type, "architectures": [ARCH[model_type]], COUNT_FIELD.get(model_type, "num_experts"): n,
           "num_experts_per_tok": k, **(config or {})}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def gpt_oss(path: Path, preset: str = "tiny", experts: int | None = None, edit: Callable[[dict], None] | None = None) -> Path:
    g = PRESETS[preset] if experts is None else dataclasses.replace(PRESETS[preset], num_experts=experts)
    write_checkpoint(path, g)
    if edit:
        cfg = json.loads((path / "config.json").read_text())
        edit(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    return path


def run_check(path: Path, *args: str) -> tuple[int, dict]:
    r = CliRunner().invoke(main, ["check", str(path), "--json", *args], catch_exceptions=False)
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.output)


# --- every rule of every target --------------------------------------------------------------------

def every(status: str, targets: tuple[str, ...] = TARGETS) -> dict[str, str]:
    return {t: status for t in targets}


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], Path]
    expect: dict[str, dict[str, str]]  # rule -> target -> status
    ep: int | None = None
    args: tuple[str, ...] = field(default=())


def _drop_quant(cfg: dict) -> None:
    del cfg["quantization_config"]


def _compressed(path: Path, ignore_experts: bool = True) -> Path:
    """A compressed-tensors checkpoint with two experts' down_proj left in BF16; without
    ``ignore_experts`` its ignore list does not say so."""
    from tests.quantized import CT_IGNORED, write_quantized

    write_quantized(path, "compressed-tensors")
    if not ignore_experts:
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"]["ignore"] = [e for e in cfg["quantization_config"]["ignore"] if e not in CT_IGNORED]
        (path / "config.json").write_text(json.dumps(cfg))
    return path


CASES: dict[str, Case] = {
    "qwen3-8-experts": Case(lambda p: write_moe(p, "qwen3_moe", 8, 2), {
        "uniform": every("pass"), "config-count": every("pass"), "config-topk": every("pass"),
        "topk-le-count": every("pass"), "n-group": every("skip"),
        "flashinfer-routing": every("pass", ("vllm", "sglang", "trtllm")), "vllm-topk-softmax": every("pass", ("vllm",)),
        "llamacpp-max-experts": every("pass", ("llamacpp",)), "quantization-config": every("pass"),
        "expert-parallel": every("skip", ("vllm", "sglang", "trtllm", "transformers"))}),
    "qwen3-non-uniform": Case(lambda p: write_moe(p, "qwen3_moe", 8, 2, per_layer={1: 4}), {"uniform": every("fail")}),
    "gpt-oss-stale-alias": Case(lambda p: gpt_oss(p, edit=lambda c: c.update(num_experts=6)),
                                {"config-count": every("fail"), "uniform": every("pass")}),
    "gpt-oss-no-count-field": Case(lambda p: gpt_oss(p, edit=lambda c: c.pop("num_local_experts")),
                                   {"config-count": every("fail")}),
    "top-k-fields-disagree": Case(lambda p: gpt_oss(p, edit=lambda c: c.update(experts_per_token=4)),
                                  {"config-topk": every("fail")}),
    "top-k-equals-count": Case(lambda p: write_moe(p, "qwen3_moe", 8, 8), {
        "topk-le-count": {"vllm": "pass", "sglang": "pass", "trtllm": "fail", "llamacpp": "pass", "transformers": "pass"}}),
    "top-k-above-count": Case(lambda p: write_moe(p, "qwen3_moe", 4, 6), {"topk-le-count": every("fail")}),
    "groups-balanced": Case(lambda p: write_moe(p, "deepseek_v3", 8, 2, config={"n_group": 2, "topk_group": 1}),
                            {"n-group": every("pass"), "vllm-topk-softmax": every("skip", ("vllm",))}),
    "groups-indivisible": Case(lambda p: write_moe(p, "glm4_moe", 6, 2, config={"n_group": 4, "topk_group": 1}),
                               {"n-group": every("fail")}),
    "groups-reach-equals-top-k": Case(lambda p: write_moe(p, "deepseek_v3", 8, 2, config={"n_group": 4, "topk_group": 1}), {
        "n-group": {"vllm": "pass", "sglang": "pass", "trtllm": "fail", "llamacpp": "pass", "transformers": "pass"}}),
    "topk-group-above-n-group": Case(lambda p: write_moe(p, "deepseek_v3", 8, 2, config={"n_group": 2, "topk_group": 3}),
                                     {"n-group": every("fail")}),
    "gpt-oss-6-experts": Case(lambda p: gpt_oss(p, experts=6), {
        "flashinfer-routing": {"vllm": "fail", "sglang": "warn", "trtllm": "fail"},
        "vllm-topk-softmax": {"vllm": "warn"}, "uniform": every("pass")}),
    "qwen3-6-experts": Case(lambda p: write_moe(p, "qwen3_moe", 6, 2),
                            {"flashinfer-routing": {"vllm": "warn", "sglang": "warn", "trtllm": "fail"}}),
    "520-experts": Case(lambda p: write_moe(p, "qwen3_moe", 520, 2, layers=1), {
        "llamacpp-max-experts": {"llamacpp": "fail"}, "flashinfer-routing": {"trtllm": "fail"},
        "vllm-topk-softmax": {"vllm": "warn"}}),
    "top-k-12": Case(lambda p: write_moe(p, "qwen3_moe", 16, 12), {"flashinfer-routing": {"trtllm": "fail"}}),
    "ep-even": Case(lambda p: write_moe(p, "qwen3_moe", 8, 2), {
        "expert-parallel": every("pass", ("vllm", "sglang", "trtllm", "transformers"))}, ep=4),
    "ep-uneven": Case(lambda p: write_moe(p, "qwen3_moe", 8, 2), {
        "expert-parallel": {"vllm": "warn", "sglang": "fail", "trtllm": "fail", "transformers": "fail"}}, ep=3),
    "mxfp4-without-quant-config": Case(lambda p: gpt_oss(p, edit=_drop_quant), {"quantization-config": every("fail")}),
    "bf16-with-mxfp4-config": Case(lambda p: gpt_oss(p, "tiny-bf16", edit=lambda c: c.update(
        quantization_config={"quant_method": "mxfp4"})), {"quantization-config": every("fail")}),
    "bf16-gpt-oss": Case(lambda p: gpt_oss(p, "tiny-bf16"), {"quantization-config": every("pass")}),
    "fp8-without-quant-config": Case(lambda p: write_moe(p, "deepseek_v3", 8, 2, expert_dtype="F8_E4M3",
                                                         config={"n_group": 2, "topk_group": 1}),
                                     {"quantization-config": every("fail")}),
    "fp8-with-quant-config": Case(lambda p: write_moe(p, "deepseek_v3", 8, 2, expert_dtype="F8_E4M3", config={
        "n_group": 2, "topk_group": 1, "quantization_config": {"quant_method": "fp8"}}),
                                  {"quantization-config": every("pass")}),
    "compressed-tensors-ignore-matches": Case(_compressed, {"quantization-modules": every("pass"),
                                                            "quantization-config": every("pass")}),
    "compressed-tensors-ignore-misses-experts": Case(lambda p: _compressed(p, ignore_experts=False),
                                                     {"quantization-modules": every("fail")}),
    "unquantized-modules-rule-skips": Case(lambda p: write_moe(p, "qwen3_moe", 8, 2),
                                           {"quantization-modules": every("skip")}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_verdicts(name, tmp_path):
    case = CASES[name]
    path = case.build(tmp_path / "ckpt")
    code, doc = run_check(path, *(["--ep", str(case.ep)] if case.ep else []))
    got = {(v["target"], v["rule"]): v for v in doc["verdicts"]}
    for rule, by_target in case.expect.items():
        for target, status in by_target.items():
            v = got[(target, rule)]
            assert v["status"] == status, f"{target} {rule}: {v}"
            assert v["source"] and v["message"]
    failed = any(v["status"] == "fail" for v in doc["verdicts"])
    assert doc["ok"] is not failed and code == (1 if failed else 0)


def test_every_rule_of_every_target_has_a_passing_and_a_failing_case():
    seen: dict[tuple[str, str], set[str]] = {}
    for case in CASES.values():
        for rule, by_target in case.expect.items():
            for target, status in by_target.items():
                seen.setdefault((target, rule), set()).add(status)
    for rule in RULES:
        for target in rule.targets:
            statuses = seen.get((target, rule.id), set())
            assert "pass" in statuses and statuses & {"fail", "warn"}, (target, rule.id, statuses)


def test_check_table_and_bad_input(tmp_path):
    path = write_moe(tmp_path / "q", "qwen3_moe", 6, 2)
    out = cli("check", path, "--target", "trtllm", expect=1)
    assert "flashinfer-routing" in out and "FAIL" in out and "-> FAILED" in out
    assert "vllm" not in out.split("\n", 1)[1]  # only the target asked for
    out = cli("check", path, "--target", "vllm", expect=0)
    assert "warn" in out and "-> OK" in out
    for args, what in [((tmp_path / "missing",), "no such checkpoint"),
                       ((path, "--target", "tgi"), "Invalid value for '--target'"),
                       ((path, "--ep", "0"), "Invalid value for '--ep'")]:
        out = cli("check", *args, expect=2)
        assert what in out and "Traceback" not in out
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "model.safetensors").write_bytes(encode_header([("w", "BF16", (2, 2))]) + bytes(8))
    (dense / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = cli("check", dense, expect=2)
    assert out.startswith("error:") and "not a supported MoE family" in out
    (path / "config.json").write_text("{not json")
    out = cli("check", path, expect=2)
    assert out.startswith("error:") and "config.json" in out and "Traceback" not in out


# --- outputs of each family ----------------------------------------------------------------------

FAMILY_SOURCES: dict[str, Callable[[Path], Path]] = {
    "gpt_oss": lambda p: gpt_oss(p),
    "gpt_oss_bf16": lambda p: gpt_oss(p, "tiny-bf16"),
    "qwen3_moe": lambda p: write_moe(p, "qwen3_moe", 8, 2),
    "qwen2_moe": lambda p: write_moe(p, "qwen2_moe", 8, 2),
    "mixtral": lambda p: write_moe(p, "mixtral", 8, 2),
    "olmoe": lambda p: write_moe(p, "olmoe", 8, 2),
    "deepseek_v3": lambda p: write_moe(p, "deepseek_v3", 8, 2, config={"n_group": 2, "topk_group": 2}),
    "glm4_moe_fp8": lambda p: write_moe(p, "glm4_moe", 8, 2, expert_dtype="F8_E4M3", config={
        "n_group": 2, "topk_group": 2, "quantization_config": {"quant_method": "fp8"}}),
}


@pytest.mark.parametrize("family", sorted(FAMILY_SOURCES))
def test_check_on_pruned_output_of_each_family(family, tmp_path):
    src = FAMILY_SOURCES[family](tmp_path / "src")
    (tmp_path / "keep.json").write_text(json.dumps({"0": [0, 1, 4, 6], "1": [1, 3, 5, 7]}))
    code, before = run_check(src)
    cli("prune", src, tmp_path / "dst", "--keep-list", tmp_path / "keep.json", "--quiet", "--target", "vllm",
        "--target", "trtllm")
    code, doc = run_check(tmp_path / "dst")
    assert code == 0 and doc["ok"] and doc["experts_per_layer"] == 4 and before["experts_per_layer"] == 8
    statuses = {(v["target"], v["rule"]): v["status"] for v in doc["verdicts"]}
    assert all(statuses[(t, r)] == "pass" for t in TARGETS for r in ("uniform", "config-count", "topk-le-count",
                                                                       "quantization-config"))
    recorded = json.loads((tmp_path / "dst" / "pruning.json").read_text())["plan"]["provenance"]["serving"]
    assert recorded["targets"] == ["vllm", "trtllm"] and all(v["status"] != "fail" for v in recorded["verdicts"])


# --- plans that refuse, fit, or record -----------------------------------------------------------

@pytest.fixture
def tiny_src(tmp_path):
    src = gpt_oss(tmp_path / "src")
    synthetic_saliency(2, 8, 2, domain="code", seed=3).save(tmp_path / "s.json")
    return src


def test_plan_refuses_a_count_a_target_rejects(tiny_src, tmp_path):
    out = cli("plan", tiny_src, "--saliency", tmp_path / "s.json", "--keep-n", "5", "--target", "vllm", expect=2)
    assert out.startswith("error: the serving targets would reject this output")
    assert "vllm flashinfer-routing: 5 experts is not a multiple of 4" in out and "keep 4 experts" in out
    assert "--fit-targets" in out and "Traceback" not in out
    out = cli("prune", tiny_src, tmp_path / "dst", "--saliency", tmp_path / "s.json", "--keep-n", "5",
              "--target", "sglang", "--ep", "2", expect=2)
    assert "sglang expert-parallel: 5 experts are not divisible by --ep 2" in out
    assert not (tmp_path / "dst").exists()
    (tmp_path / "keep.json").write_text(json.dumps({"0": [0, 1, 2, 3, 4, 5], "1": [0, 1, 2, 3, 4, 5]}))
    out = cli("plan", tiny_src, "--keep-list", tmp_path / "keep.json", "--target", "trtllm", expect=2)
    assert "6 experts is not a multiple of 4" in out


def test_fit_targets_moves_the_count_and_says_so(tiny_src, tmp_path):
    out = cli("prune", tiny_src, tmp_path / "dst", "--saliency", tmp_path / "s.json", "--keep-n", "5",
              "--target", "vllm", "--target", "llamacpp", "--fit-targets", "--quiet")
    assert "--fit-targets: keeping 4 experts per layer instead of 5 (vllm flashinfer-routing" in out
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cfg["num_local_experts"] == 4
    prov = json.loads((tmp_path / "dst" / "pruning.json").read_text())["plan"]["provenance"]
    assert prov["fit_targets"].startswith("--fit-targets: keeping 4") and prov["serving"]["targets"] == ["vllm", "llamacpp"]
    code, doc = run_check(tmp_path / "dst", "--target", "vllm", "--target", "llamacpp")
    assert code == 0


def test_soft_prune_checks_the_unchanged_count(tmp_path):
    src = gpt_oss(tmp_path / "src", experts=6)
    (tmp_path / "keep.json").write_text(json.dumps({"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}))
    out = cli("soft-prune", src, tmp_path / "soft", "--keep-list", tmp_path / "keep.json", "--target", "trtllm", expect=2)
    assert "6 experts is not a multiple of 4" in out and "a soft prune keeps all 6 experts" in out
    cli("soft-prune", src, tmp_path / "soft", "--keep-list", tmp_path / "keep.json", "--target", "llamacpp", "--quiet")
    assert run_check(tmp_path / "soft", "--target", "llamacpp")[0] == 0


def test_120b_geometry_plan_for_vllm_with_ep8(tmp_path):
    """The full 120B geometry (36 layers x 128 experts, real headers over holes): planning reads
    headers only, so the count decision is the real one; --keep-frac 0.45 asks for 58."""
    cli("synth", "--preset", "120b", "--sparse", tmp_path / "120b")
    synthetic_saliency(36, 128, 4).save(tmp_path / "s.json")
    args = ("--saliency", tmp_path / "s.json", "--keep-frac", "0.45", "--target", "vllm", "--ep", "8")
    out = cli("plan", tmp_path / "120b", *args, expect=2)
    assert "58 experts is not a multiple of 4" in out and "keep 56 experts" in out
    out = cli("plan", tmp_path / "120b", *args, "--fit-targets", "--out", tmp_path / "p.json")
    assert "keeping 56 experts per layer instead of 58" in out
    plan = json.loads((tmp_path / "p.json").read_text())
    assert {len(v) for v in plan["expert_mapping"].values()} == {56} and len(plan["expert_mapping"]) == 36
    verdicts = plan["provenance"]["serving"]["verdicts"]
    assert {v["rule"]: v["status"] for v in verdicts}["expert-parallel"] == "pass"
    assert all(v["status"] in ("pass", "skip", "warn") for v in verdicts)


def test_prune_with_120b_expert_geometry_for_vllm_ep8(tmp_path):
    """prune end to end with the 120B expert geometry (128 experts, top-4, MXFP4 layout) on small
    tensors, so the output stays small on disk; check accepts what it wrote."""
    g = dataclasses.replace(PRESETS["tiny"], num_layers=4, num_experts=128, top_k=4, max_shard_bytes=2_000_000)
    write_checkpoint(tmp_path / "src", g, sparse=True)
    synthetic_saliency(4, 128, 4).save(tmp_path / "s.json")
    out = cli("prune", tmp_path / "src", tmp_path / "dst", "--saliency", tmp_path / "s.json", "--keep-frac", "0.45",
              "--target", "vllm", "--ep", "8", "--fit-targets", "--quiet")
    assert "keeping 56 experts per layer instead of 58" in out
    code, doc = run_check(tmp_path / "dst", "--target", "vllm", "--ep", "8")
    assert code == 0 and doc["experts_per_layer"] == 56
    assert {v["rule"]: v["status"] for v in doc["verdicts"]}["expert-parallel"] == "pass"


def test_fit_targets_prefers_up_and_respects_keep_multiple(tiny_src, tmp_path):
    out = cli("plan", tiny_src, "--saliency", tmp_path / "s.json", "--keep-n", "7", "--target", "vllm", "--fit-targets",
              "--out", tmp_path / "p.json")
    # 8 is nearer but keeps every expert (no pruning at all): the nearest count that prunes wins.
    assert "keeping 4 experts per layer instead of 7" in out
    assert {len(v) for v in json.loads((tmp_path / "p.json").read_text())["expert_mapping"].values()} == {4}
    out = cli("plan", tiny_src, "--saliency", tmp_path / "s.json", "--keep-n", "5", "--keep-multiple", "3",
              "--target", "vllm", "--fit-targets", expect=2)
    assert "6 experts is not a multiple of 4" in out and "no expert count satisfies vllm together with --keep-multiple 3" in out
