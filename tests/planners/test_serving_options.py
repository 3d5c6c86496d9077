"""Serving targets, as users meet them: the warnings a plan gets are printed, --ep and
--fit-targets need a --target, --ep cannot exceed the experts, suggestions prune, messages name
what is really wrong, and `check` judges nonsense routing fields in config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planners.serving_facts import ServingFacts
from planners.serving_fit import fit_count
from tests.cli.test_cli_errors import assert_error, invoke
from tests.conftest import cli
from tests.planners.test_serving import gpt_oss, run_check, write_moe

PLAN = ("--keep-frac", "0.5")


@pytest.mark.parametrize("command", ["plan", "prune", "soft-prune"])
def test_target_warnings_are_printed(tiny, tiny_saliency, tmp_path, command):
    args = [command, tiny] + ([tmp_path / "out"] if command != "plan" else [])
    out = cli(*args, "--saliency", tiny_saliency, *PLAN, "--target", "vllm", "--ep", "3")
    count = 8 if command == "soft-prune" else 4
    assert f"warning: vllm expert-parallel: {count} experts over 3 ranks" in out, out


@pytest.mark.parametrize("command", ["plan", "prune", "soft-prune"])
@pytest.mark.parametrize("flags", [("--ep", "2"), ("--fit-targets",)])
def test_ep_and_fit_targets_need_a_target(tiny, tiny_saliency, tmp_path, command, flags):
    args = [command, tiny] + ([tmp_path / "out"] if command != "plan" else [])
    assert_error(invoke(*args, "--saliency", tiny_saliency, *PLAN, *flags), contains=f"{flags[0]} describes")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ep", ["5", "99999999999999999999"])
def test_ep_beyond_the_expert_count_fails(tiny, tiny_saliency, ep):
    line = invoke("plan", tiny, "--saliency", tiny_saliency, *PLAN, "--target", "vllm", "--ep", ep).output
    assert f"--ep {ep} ranks for 4 experts per layer" in line and "use at most 4 ranks" in line
    assert f"no expert count satisfies vllm together with --ep {ep}; change --ep" in line


def test_check_fails_ep_beyond_the_expert_count(tiny):
    code, doc = run_check(tiny, "--target", "vllm", "--ep", "9")
    assert code == 1
    assert {v["rule"]: v["status"] for v in doc["verdicts"]}["expert-parallel"] == "fail"


def test_one_target_is_not_called_every_target(tiny, tiny_saliency):
    r = invoke("plan", tiny, "--saliency", tiny_saliency, *PLAN, "--target", "trtllm", "--ep", "3")
    assert "every target" not in r.output and "no expert count satisfies trtllm together with --ep 3" in r.output


def test_suggestion_prunes_rather_than_keeping_every_expert(tiny, tiny_saliency):
    r = invoke("plan", tiny, "--saliency", tiny_saliency, "--keep-n", "6", "--target", "vllm")
    assert r.exit_code == 2 and "keep 4 experts per layer (--keep-n 4)" in r.output, r.output


def test_fit_count_breaks_ties_upwards_among_pruning_counts():
    facts = ServingFacts("gpt_oss", {0: 128}, {"num_local_experts": 128}, {"num_experts_per_tok": 4})
    assert fit_count(facts, 58, 128, ["vllm"], 4) == 60   # 56 and 60 both 2 away: up first
    assert fit_count(facts, 127, 128, ["vllm"], None) == 124  # 128 is every expert
    assert fit_count(facts, 128, 128, ["vllm"], None) == 128  # asked for every expert


def test_nonuniform_plan_names_the_real_problem(tiny, tiny_saliency):
    r = invoke("plan", tiny, "--saliency", tiny_saliency, "--budget", "7", "--allow-nonuniform", "--target", "vllm")
    assert r.exit_code == 2
    assert "config.json says" not in r.output and "expert counts differ between layers" in r.output
    assert "instead of different counts per layer (--budget" in r.output


# --- check: routing fields of config.json --------------------------------------------------------

def _verdicts(path: Path, target: str = "vllm") -> dict[str, tuple[str, str]]:
    code, doc = run_check(path, "--target", target)
    return {v["rule"]: (v["status"], v["message"]) for v in doc["verdicts"]}


@pytest.mark.parametrize("field", ["num_experts_per_tok", "experts_per_token"])
def test_top_k_zero_fails(tmp_path, field):
    src = gpt_oss(tmp_path / "m", edit=lambda c: c.update({field: 0}))
    v = _verdicts(src)
    assert v["config-topk"][0] == "fail" and "positive integers" in v["config-topk"][1]


@pytest.mark.parametrize("value", ["4", 0, -2, 2.0, True])
def test_deepseek_n_group_must_be_a_positive_integer(tmp_path, value):
    src = write_moe(tmp_path / "ds", "deepseek_v3", 8, 2, config={"n_group": value, "topk_group": 1})
    status, message = _verdicts(src)["n-group"]
    assert status == "fail" and f"n_group is {value!r}; expected an integer >= 1" in message


def test_deepseek_topk_group_must_be_a_positive_integer(tmp_path):
    src = write_moe(tmp_path / "ds", "deepseek_v3", 8, 2, config={"n_group": 2, "topk_group": "1"})
    status, message = _verdicts(src)["n-group"]
    assert status == "fail" and "topk_group is '1'" in message


def test_n_group_on_a_family_without_groups_says_so(tmp_path):
    src = gpt_oss(tmp_path / "m", edit=lambda c: c.update({"n_group": 3}))
    status, message = _verdicts(src)["n-group"]
    assert status == "skip" and message == "gpt_oss routes without expert groups"


def test_quantization_config_that_is_not_an_object_fails(tmp_path):
    src = gpt_oss(tmp_path / "m", edit=lambda c: c.update({"quantization_config": "mxfp4"}))
    status, message = _verdicts(src)["quantization-config"]
    assert status == "fail" and "quantization_config is 'mxfp4'; expected an object" in message
    code, _ = run_check(src, "--target", "vllm")
    assert code == 1


def test_well_formed_groups_still_pass(tmp_path):
    src = write_moe(tmp_path / "ds", "deepseek_v3", 8, 2, config={"n_group": 2, "topk_group": 1})
    assert _verdicts(src)["n-group"] == ("pass", "2 groups of 4 experts, topk_group 1")
    assert json.loads((src / "config.json").read_text())["n_group"] == 2
