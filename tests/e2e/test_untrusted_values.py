"""Numbers and names from options and files that would otherwise pass unchecked: NaN and
infinity in float options and REAP observer files, saliency identities of the wrong type, and
domain names that would break the model card's tables. Each is one rc-2 `error:` line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli_errors import assert_error, invoke
from tests.conftest import cli

PLAN = ("--keep-frac", "0.5")


@pytest.mark.parametrize("option,value", [
    ("--coverage", "nan"), ("--keep-frac", "nan"), ("--keep-frac", "inf"),
    ("--read-mbps", "nan"), ("--read-mbps", "inf"), ("--write-mbps", "nan"), ("--write-mbps", "-inf"),
])
def test_float_options_must_be_finite(tiny, tiny_saliency, option, value):
    args = ["plan", tiny, "--saliency", tiny_saliency, *PLAN, option, value]
    if option == "--keep-frac":
        args = ["plan", tiny, "--saliency", tiny_saliency, option, value]
    line = assert_error(invoke(*args), contains=option)
    assert "finite" in line or "(0, 1]" in line


@pytest.mark.parametrize("weight", ["code=nan", "code=inf", "code=-1"])
def test_domain_weight_must_be_finite_and_non_negative(tiny, tiny_saliency, weight):
    assert_error(invoke("plan", tiny, "--saliency", tiny_saliency, *PLAN, "--weight", weight),
                 contains="a domain weight is a finite number >= 0")


@pytest.mark.parametrize("option", ["--gate-jsd", "--gate-ppl-abs"])
def test_eval_gates_must_be_finite(tiny, tmp_path, option):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c d"}\n')
    assert_error(invoke("eval", tiny, "--data", data, option, "nan"), contains=option)


def _edited_saliency(src: Path, tmp_path: Path, **changes) -> Path:
    doc = json.loads(src.read_text())
    for key, value in changes.items():
        if key == "fingerprint":
            doc["model"]["fingerprint"] = value
        else:
            doc[key] = value
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(doc))
    return out


@pytest.mark.parametrize("value", [5, None, ["x"], {"a": 1}])
def test_saliency_fingerprint_of_another_type_is_refused(tiny, tiny_saliency, tmp_path, value):
    sal = _edited_saliency(tiny_saliency, tmp_path, fingerprint=value)
    assert_error(invoke("plan", tiny, "--saliency", sal, *PLAN), contains="\"model.fingerprint\" is")


@pytest.mark.parametrize("domain", ["../../x\n|y", 5, "a|b", " code", "x" * 101, "w=1", "tab\there"])
def test_saliency_domain_must_be_a_safe_name(tiny, tiny_saliency, tmp_path, domain):
    sal = _edited_saliency(tiny_saliency, tmp_path, domain=domain)
    assert_error(invoke("plan", tiny, "--saliency", sal, *PLAN), contains=f"\"domain\" {domain!r}")


def test_safe_domain_names_still_work(tiny, tiny_saliency, tmp_path):
    sal = _edited_saliency(tiny_saliency, tmp_path, domain="code-v2.1 (python)")
    cli("plan", tiny, "--saliency", sal, *PLAN, "--weight", "code-v2.1 (python)=2", "--out", tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["provenance"]["saliency"][0]["domain"] == "code-v2.1 (python)"


@pytest.mark.parametrize("command", ["synth-saliency", "import-reap"])
def test_domain_option_must_be_a_safe_name(tiny, tmp_path, command):
    torch = pytest.importorskip("torch")
    source = tiny
    if command == "import-reap":
        source = tmp_path / "obs.pt"
        torch.save({0: {"expert_frequency": torch.tensor([3, 1]), "reap": torch.tensor([0.5, 0.25])}}, source)
    assert_error(invoke(command, source, "--out", tmp_path / "s.json", "--domain", "a\n| b"), contains="--domain")
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("reap", [[float("nan"), 1.0], [float("inf"), 1.0], [-1.0, 1.0]])
def test_import_reap_refuses_scores_that_are_not_finite(tmp_path, reap):
    torch = pytest.importorskip("torch")
    obs = tmp_path / "obs.pt"
    torch.save({0: {"expert_frequency": torch.tensor([3, 1]), "reap": torch.tensor(reap)}}, obs)
    assert_error(invoke("import-reap", obs, "--out", tmp_path / "s.json"), contains="layer 0 reap: expert 0 is")
    assert not (tmp_path / "s.json").exists()
    torch.save({0: {"expert_frequency": torch.tensor([3.0, float("nan")]),
                    "weighted_ean_sum": torch.tensor([1.0, 1.0])}}, obs)
    assert_error(invoke("import-reap", obs, "--out", tmp_path / "s.json"),
                 contains="layer 0 expert_frequency: expert 1 is nan")
