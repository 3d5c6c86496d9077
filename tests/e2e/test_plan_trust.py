"""What a plan may not decide: the output config (derived from the source), the bytes of the files
it copies (hashed when planning), and names a terminal or file browser would misread. Each hostile
plan is one rc-2 line naming the plan file and the field, through `run` and `verify`
(`dry-run` plans for itself from the source)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from rewriter.tools.synth import PRESETS, write_checkpoint
from tests.conftest import cli


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("trust") / "src"
    write_checkpoint(d, PRESETS["tiny"])
    (d / "tokenizer.json").write_text('{"version": "1.0"}\n')
    config = json.loads((d / "config.json").read_text())
    config["_name_or_path"] = "/home/alice/models/tiny"
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return d


@pytest.fixture(scope="module")
def plan_doc(src, tmp_path_factory) -> dict[str, Any]:
    sal = tmp_path_factory.mktemp("sal") / "sal.json"
    cli("synth-saliency", src, "--out", sal)
    p = sal.parent / "plan.json"
    cli("plan", src, "--saliency", sal, "--keep-frac", "0.5", "--out", p)
    return json.loads(p.read_text())


def _write(tmp_path: Path, doc: dict[str, Any], name: str = "bad.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def _edited(plan_doc: dict[str, Any], **config: Any) -> dict[str, Any]:
    doc = copy.deepcopy(plan_doc)
    doc["config"].update(config)
    return doc


CONFIG_EDITS = {
    "auto_map": {"auto_map": {"AutoModelForCausalLM": "evil.Model"}},
    "rope_theta": {"rope_theta": 1},
    "top_k": {"num_experts_per_tok": 10**9},
}


@pytest.mark.parametrize("name", sorted(CONFIG_EDITS))
def test_run_refuses_a_config_the_source_does_not_imply(tmp_path: Path, plan_doc, name):
    bad = _write(tmp_path, _edited(plan_doc, **CONFIG_EDITS[name]))
    out = cli("run", bad, "--out", tmp_path / "dst", expect=2)
    assert out.startswith(f"error: {bad}: plan field 'config' differs"), out
    assert name.split("_")[0] in out or "num_experts_per_tok" in out
    assert not (tmp_path / "dst" / "config.json").exists()


def test_run_refuses_an_edited_config_patch(tmp_path: Path, plan_doc):
    doc = copy.deepcopy(plan_doc)
    doc["config_patch"]["num_local_experts"] = 3
    doc["config"]["num_local_experts"] = 3
    bad = _write(tmp_path, doc)
    out = cli("run", bad, "--out", tmp_path / "dst", expect=2)
    assert "plan field 'config_patch' differs" in out and "num_local_experts" in out, out


def test_output_config_drops_a_local_name_or_path(tmp_path: Path, plan_doc, src):
    good = _write(tmp_path, plan_doc, "good.json")
    dst = tmp_path / "dst"
    cli("run", good, "--out", dst)
    config = json.loads((dst / "config.json").read_text())
    assert config["_name_or_path"] == "" and plan_doc["config_patch"]["_name_or_path"] == ""
    assert "/home/alice" not in (dst / "README.md").read_text()
    assert cli("verify", src, dst).strip().endswith("OK")


def test_published_files_hold_no_path_of_this_machine(tmp_path: Path, plan_doc, src):
    good = _write(tmp_path, plan_doc, "good.json")
    dst = tmp_path / "dst"
    cli("run", good, "--out", dst)
    for f in dst.rglob("*"):
        if f.is_file():
            text = f.read_bytes()
            assert str(src).encode() not in text and str(tmp_path).encode() not in text, f
    record = json.loads((dst / "pruning.json").read_text())
    assert record["source"] == record["plan"]["source"]["url"] == "local:src"
    assert [s["path"] for s in record["plan"]["provenance"]["saliency"]] == ["sal.json"]
    # verify from the destination alone cannot know where a local source is: it says what to pass
    out = cli("verify", dst, expect=2)
    assert out.startswith(f"error: {dst / 'pruning.json'} records its source as 'local:src'"), out
    assert "rewriter verify SRC DST" in out
    assert cli("verify", src, dst).strip().endswith("OK")


def test_the_plan_pruning_json_publishes_does_not_run(tmp_path: Path, plan_doc):
    good = _write(tmp_path, plan_doc, "good.json")
    dst = tmp_path / "dst"
    cli("run", good, "--out", dst)
    published = _write(tmp_path, json.loads((dst / "pruning.json").read_text())["plan"], "published.json")
    out = cli("run", published, "--out", tmp_path / "again", expect=2)
    assert out.startswith(f"error: {published} records its source as 'local:src'"), out
    assert "rewriter plan SRC" in out and not (tmp_path / "again").exists()


def test_card_verify_names_the_folder_it_verified_against(tmp_path: Path, plan_doc, src):
    good = _write(tmp_path, plan_doc, "good.json")
    dst = tmp_path / "dst"
    cli("run", good, "--out", dst)
    out = cli("card", dst, "--base-model", "openai/gpt-oss-20b", "--verify", expect=2)
    assert "--src" in out or "SRC" in out, out
    cli("card", dst, "--base-model", "openai/gpt-oss-20b", "--verify", "--src", src)
    card = (dst / "README.md").read_text()
    assert "`rewriter verify` against `src`" in card, card
    assert "against `openai/gpt-oss-20b`" not in card


def test_verify_refuses_a_config_edited_in_pruning_json_and_output(tmp_path: Path, plan_doc, src):
    good = _write(tmp_path, plan_doc, "good.json")
    dst = tmp_path / "dst"
    cli("run", good, "--out", dst)
    record = json.loads((dst / "pruning.json").read_text())
    record["plan"]["config"]["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (dst / "pruning.json").write_text(json.dumps(record))
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (dst / "config.json").write_text(json.dumps(config))
    out = cli("verify", src, dst, expect=1)
    assert "plan field 'config' differs" in out and "auto_map" in out and "FAILED" in out, out


def test_a_copied_file_changed_since_planning_is_refused(tmp_path: Path, plan_doc):
    local = tmp_path / "src"
    write_checkpoint(local, PRESETS["tiny"])
    (local / "tokenizer.json").write_text('{"version": "1.0"}\n')
    plan = tmp_path / "plan.json"
    sal = tmp_path / "sal.json"
    cli("synth-saliency", local, "--out", sal)
    cli("plan", local, "--saliency", sal, "--keep-frac", "0.5", "--out", plan)
    recorded = json.loads(plan.read_text())["copy_file_digests"]
    assert recorded["tokenizer.json"]["size"] == len('{"version": "1.0"}\n')
    (local / "tokenizer.json").write_text('{"version": "evil"}\n')
    out = cli("run", plan, "--out", tmp_path / "dst", expect=2)
    assert f"error: {plan}:" in out and "tokenizer.json" in out and "plan again" in out, out
    assert not (tmp_path / "dst" / "tokenizer.json").exists()


def test_verify_finds_a_copied_file_edited_in_the_output(tmp_path: Path, plan_doc, src):
    good = _write(tmp_path, plan_doc, "good.json")
    dst = tmp_path / "dst"
    cli("run", good, "--out", dst)
    (dst / "tokenizer.json").write_text('{"version": "evil"}\n')
    out = cli("verify", src, dst, expect=1)
    assert "tokenizer.json" in out and "the plan recorded" in out, out


def test_a_plan_without_file_digests_is_refused(tmp_path: Path, plan_doc):
    doc = copy.deepcopy(plan_doc)
    doc["copy_file_digests"].pop("tokenizer.json")
    out = cli("run", _write(tmp_path, doc), "--out", tmp_path / "dst", expect=2)
    assert "copy_file_digests" in out, out


def test_a_version_1_plan_is_refused_with_what_to_do(tmp_path: Path, plan_doc):
    doc = copy.deepcopy(plan_doc)
    doc["version"] = 1
    out = cli("run", _write(tmp_path, doc), "--out", tmp_path / "dst", expect=2)
    assert "plan version 1" in out and "rewriter plan" in out, out


@pytest.mark.parametrize("version, shown, todo", [
    (True, "plan version true;", "make the plan again"),  # JSON true is no version 1
    (2.0, "plan version 2.0;", "make the plan again"),
    ("2", 'plan version "2";', "make the plan again"),
    (-2, "plan version -2;", "make the plan again"),
    (10**60, "plan version " + "1" + "0" * 36 + "...;", "upgrade moe-rewriter"),
    (4, "plan version 4;", "upgrade moe-rewriter"),
])
def test_a_plan_version_that_is_not_2_or_3_is_refused_saying_what_it_is(tmp_path: Path, plan_doc, version, shown, todo):
    doc = copy.deepcopy(plan_doc)
    doc["version"] = version
    for args in (["run", _write(tmp_path, doc), "--out", tmp_path / "dst"], ["dry-run", _write(tmp_path, doc)]):
        out = cli(*args, expect=2)
        (line,) = [x for x in out.splitlines() if x.startswith("error:")]
        assert shown in line and todo in line and "bad.json" in line, line
    assert not (tmp_path / "dst").exists()


BAD_NAMES = {
    "hidden": (".safetensors", "starting with '.'"),
    "esc": ("model-\x1b[2Jx.safetensors", "U+001B"),
    "newline": ("model\nx.safetensors", "U+000A"),
    "tab": ("model\tx.safetensors", "U+0009"),
    "rtl": ("model-\u202egpj.safetensors", "U+202E"),
    "space": ("model x.safetensors", "U+0020"),
}


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_run_refuses_an_output_name_terminals_misread(tmp_path: Path, plan_doc, case):
    name, shown = BAD_NAMES[case]
    doc = copy.deepcopy(plan_doc)
    doc["outputs"][0]["name"] = name
    out = cli("run", _write(tmp_path, doc), "--out", tmp_path / "dst", expect=2)
    assert "outputs[0].name" in out and shown in out, out
    assert "\x1b" not in out and "\u202e" not in out
    assert not (tmp_path / "dst").exists() or not any(p.name != ".rewriter" for p in (tmp_path / "dst").iterdir())


@pytest.mark.parametrize("case", ["rtl", "esc", "hidden"])
def test_run_refuses_a_copied_file_name_terminals_misread(tmp_path: Path, plan_doc, case):
    name, shown = BAD_NAMES[case]
    name = name.replace(".safetensors", ".json")
    doc = copy.deepcopy(plan_doc)
    doc["copy_files"].append(name)
    doc["copy_file_digests"][name] = {"size": 0, "sha256": "0" * 64}
    out = cli("run", _write(tmp_path, doc), "--out", tmp_path / "dst", expect=2)
    assert "copy_files[" in out and shown.replace(".safetensors", ".json") in out, out


def test_planning_leaves_out_files_a_hub_repo_could_not_hold(tmp_path: Path):
    local = tmp_path / "src"
    write_checkpoint(local, PRESETS["tiny"])
    (local / "notes\u202etxt.md").write_text("x")
    sal = tmp_path / "sal.json"
    cli("synth-saliency", local, "--out", sal)
    plan = tmp_path / "plan.json"
    cli("plan", local, "--saliency", sal, "--keep-frac", "0.5", "--out", plan)
    doc = json.loads(plan.read_text())
    assert "notes\u202etxt.md" in doc["skipped_files"] and "notes\u202etxt.md" not in doc["copy_files"]
    cli("run", plan, "--out", tmp_path / "dst")
    assert not (tmp_path / "dst" / "notes\u202etxt.md").exists()


def test_nonuniform_output_is_readable_by_inspect_check_and_verify(tmp_path: Path, src):
    sal = tmp_path / "sal.json"
    cli("synth-saliency", src, "--out", sal)
    plan = tmp_path / "plan.json"
    cli("plan", src, "--saliency", sal, "--budget", "9", "--allow-nonuniform", "--out", plan)
    doc = json.loads(plan.read_text())
    counts = {layer: len(ids) for layer, ids in doc["expert_mapping"].items()}
    assert len(set(counts.values())) > 1, counts
    dst = tmp_path / "dst"
    cli("run", plan, "--out", dst, "--allow-nonuniform")
    config = json.loads((dst / "config.json").read_text())
    assert config["num_experts_per_layer"] == counts
    assert config["num_local_experts"] == max(counts.values())
    info = json.loads(cli("inspect", dst, "--json"))
    assert info["experts_per_layer"] == [min(counts.values()), max(counts.values())]
    assert [entry["experts"] for entry in info["layers"]] == [counts[k] for k in sorted(counts, key=int)]
    out = cli("check", dst, expect=None)
    assert f"{min(counts.values())}-{max(counts.values())} experts per layer" in out, out
    assert f"{min(counts.values())} experts in the smallest layer" in out, out
    assert cli("verify", src, dst).strip().endswith("OK")


@pytest.mark.torch
def test_eval_of_a_nonuniform_output_says_why_it_cannot_load(tmp_path: Path, src):
    pytest.importorskip("transformers")
    sal = tmp_path / "sal.json"
    cli("synth-saliency", src, "--out", sal)
    plan = tmp_path / "plan.json"
    cli("plan", src, "--saliency", sal, "--budget", "9", "--allow-nonuniform", "--out", plan)
    dst = tmp_path / "dst"
    cli("run", plan, "--out", dst, "--allow-nonuniform")
    pack = tmp_path / "pack.jsonl"
    pack.write_text("".join(json.dumps({"input_ids": list(range(i, i + 70))}) + "\n" for i in range(4)))
    out = cli("eval", dst, "--data", pack, "--seq-len", "32", "--blocks", "2", "--device", "cpu", expect=2)
    assert out.startswith(f"error: {dst / 'config.json'}: its layers keep different expert counts"), out
