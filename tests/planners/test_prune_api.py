"""The planning API, planners.plan_prune: the same plans as the CLI, the project's own errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from core.checkpoint import Checkpoint
from core.errors import OptionError, PolicyError, SaliencyError
from planners import PlanOptions, plan_prune
from planners.plan import Plan
from planners.policies import KeepPolicy
from tests.conftest import cli


def test_same_plan_as_the_cli(tiny, tiny_saliency, tmp_path):
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--keep-multiple", "2",
        "--max-shard-size", "1MB", "--out", tmp_path / "cli.json")
    plan = plan_prune(str(tiny), PlanOptions(saliency=(str(tiny_saliency),), policy=KeepPolicy(keep_frac=0.5, keep_multiple=2),
                                             max_shard_bytes=10**6))
    assert plan.digest == Plan.load(str(tmp_path / "cli.json")).digest
    assert {len(k) for k in plan.keep.values()} == {4}


def test_an_open_checkpoint_is_planned_without_reopening(tiny, tiny_saliency):
    ckpt = Checkpoint.open(str(tiny))
    read = ckpt.storage.counter.bytes
    plan = plan_prune(ckpt, PlanOptions(saliency=(str(tiny_saliency),), policy=KeepPolicy(keep_n=4)))
    copied = sum(d["size"] for d in plan.copy_digests.values())  # the files it copies are hashed
    assert ckpt.storage.counter.bytes == read + copied  # headers were read once, by open
    assert plan.provenance["source_experts_per_layer"] == 8


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PlanOptions().keep_list = "k.json"  # type: ignore[misc]


def test_keep_list_with_weights_of_each_domain(tiny, tiny_saliency, tmp_path):
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}))
    plan = plan_prune(str(tiny), PlanOptions(keep_list=str(keep)))
    assert plan.keep == {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    weighted = plan_prune(str(tiny), PlanOptions(saliency=(str(tiny_saliency),), weights={"code": 2.0},
                                                     policy=KeepPolicy(keep_n=4)))
    assert weighted.provenance["saliency"][0]["weight"] == 2.0


@pytest.mark.parametrize("options, error, option, text", [
    (dict(saliency=("s.json",), keep_list="k.json"), OptionError, None, "not both"),
    (dict(weights={"prose": 1.0}), OptionError, "weights", "no saliency file has domain ['prose']"),
    (dict(layers_only=(7,)), OptionError, "layers_only", "7: not an MoE layer"),
    (dict(policy=KeepPolicy(budget=3)), PolicyError, None, "budget"),
])
def test_bad_options_raise_the_projects_errors(tiny, tiny_saliency, options, error, option, text):
    opts = PlanOptions(**{"saliency": (str(tiny_saliency),), "policy": KeepPolicy(keep_n=4), **options})
    with pytest.raises(error) as e:
        plan_prune(str(tiny), opts)
    assert text in str(e.value)
    if error is OptionError:
        assert e.value.option == option


def test_foreign_saliency_is_refused_unless_allowed(tiny, tmp_path):
    from planners.saliency import model_identity
    from rewriter.tools.synth import synthetic_saliency

    other = tmp_path / "other.json"
    identity = {**model_identity(Checkpoint.open(str(tiny))), "fingerprint": "0" * 64}
    synthetic_saliency(2, 8, 2, domain="code", model=identity).save(other)
    with pytest.raises(SaliencyError):
        plan_prune(str(tiny), PlanOptions(saliency=(str(other),), policy=KeepPolicy(keep_n=4)))
    assert plan_prune(str(tiny), PlanOptions(saliency=(str(other),), policy=KeepPolicy(keep_n=4),
                                             allow_foreign_saliency=True))


def test_fit_targets_notifies_and_records(tiny, tiny_saliency):
    notes: list[str] = []
    plan = plan_prune(str(tiny), PlanOptions(saliency=(str(tiny_saliency),), policy=KeepPolicy(keep_n=5), targets=("vllm",),
                                             fit_targets=True), notify=notes.append)
    assert len(notes) == 1 and notes[0].startswith("--fit-targets: keeping 4")
    assert plan.provenance["fit_targets"] == notes[0]
    assert {len(k) for k in plan.keep.values()} == {4}
