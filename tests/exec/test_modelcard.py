"""The output's model card (README.md, Hub conventions) and the folder `hf upload` gets."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import yaml

from core.checkpoint import Checkpoint
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import cli

SOURCE_CARD = "---\nlicense: apache-2.0\n---\n\n# The source model\n\nIts own card.\n"


def front_matter(text: str) -> tuple[dict, str]:
    """The YAML front matter, parsed with a real YAML parser, and the body."""
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


@pytest.fixture
def pruned(tmp_path) -> Path:
    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["tiny"])
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "openai/gpt-oss-20b"}))
    (src / "README.md").write_text(SOURCE_CARD)
    (src / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (src / "original").mkdir()
    (src / "original" / "model.safetensors").write_bytes(b"another layout")
    synthetic_saliency(2, 8, 2, domain="code", seed=5).save(tmp_path / "s.json")
    cli("prune", src, tmp_path / "dst", "--saliency", tmp_path / "s.json", "--keep-n", "4", "--target", "vllm",
        "--target", "llamacpp", "--quiet")
    return tmp_path / "dst"


def test_card_front_matter_and_body(pruned):
    meta, body = front_matter((pruned / "README.md").read_text())
    assert meta["base_model"] == "openai/gpt-oss-20b" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"moe", "expert-pruning", "gpt_oss", "mxfp4"} <= set(meta["tags"])
    prov = json.loads((pruned / "pruning.json").read_text())
    for layer, ids in prov["expert_mapping"].items():
        assert f"| {layer} | 4 | {', '.join(map(str, ids))} |" in body
    assert "| experts per MoE layer | 8 | 4 |" in body
    sal = prov["plan"]["provenance"]["saliency"][0]
    assert sal["sha256"] in body and sal["domain"] in body
    assert prov["plan_digest"] in body
    assert "| vllm | accepts |" in body and "| llamacpp | accepts |" in body and "checked when the plan was made" in body
    assert "Not recorded here" in body and "## Evaluation" not in body
    assert "hf upload" in body
    # The source's card is kept, not overwritten.
    assert (pruned / "README.base.md").read_text() == SOURCE_CARD and "README.base.md" in body


def test_output_folder_is_what_hf_upload_expects(pruned):
    files = sorted(str(p.relative_to(pruned)) for p in pruned.rglob("*"))
    assert not [f for f in files if f.startswith(".") or "/." in f or f.endswith((".tmp", ".part"))], files
    index = json.loads((pruned / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert all(re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", s) for s in shards)
    assert files == sorted([*shards, "README.md", "README.base.md", "config.json", "generation_config.json",
                            "model.safetensors.index.json", "pruning.json", "tokenizer.json"])
    ckpt = Checkpoint.open(str(pruned))  # the loader's rules: sizes, offsets, index total_size
    assert index["metadata"]["total_size"] == ckpt.total_size
    recorded = json.loads((pruned / "pruning.json").read_text())["shards"]
    assert {s: os.path.getsize(pruned / s) for s in shards} == {s: v["size"] for s, v in recorded.items()}


def test_card_without_targets_evaluates_them_and_soft_prune_says_so(tmp_path):
    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["tiny"])
    (tmp_path / "keep.json").write_text(json.dumps({"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}))
    cli("soft-prune", src, tmp_path / "soft", "--keep-list", tmp_path / "keep.json", "--quiet")
    meta, body = front_matter((tmp_path / "soft" / "README.md").read_text())
    assert "base_model" not in meta  # a local path is not a Hub id
    assert "a soft prune" in body and "| experts per MoE layer | 8 | 8 |" in body
    assert "evaluated from the plan (no `--target` was given)" in body and "| trtllm | accepts |" in body
    assert not (tmp_path / "soft" / "README.base.md").exists()


def test_an_existing_base_card_is_not_overwritten(tmp_path):
    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["tiny"])
    (src / "README.md").write_text("card of the pruned source\n")
    (src / "README.base.md").write_text("card of its base\n")
    (tmp_path / "keep.json").write_text(json.dumps({"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}))
    cli("prune", src, tmp_path / "dst", "--keep-list", tmp_path / "keep.json", "--quiet")
    assert (tmp_path / "dst" / "README.base.md").read_text() == "card of its base\n"
    assert (tmp_path / "dst" / "README.base.2.md").read_text() == "card of the pruned source\n"
    assert "README.base.2.md" in (tmp_path / "dst" / "README.md").read_text()


@pytest.mark.torch
@pytest.mark.slow
def test_card_command_adds_verify_and_a_real_eval(pruned, tmp_path):
    pytest.importorskip("transformers")
    rng = random.Random(0)
    pack = tmp_path / "pack.jsonl"
    pack.write_text("".join(json.dumps({"input_ids": [rng.randrange(256) for _ in range(70)]}) + "\n" for _ in range(8)))
    out = cli("eval", pruned, "--data", pack, "--seq-len", "32", "--blocks", "4", "--compare", tmp_path / "src",
              "--device", "cpu", "--json", expect=None)
    (tmp_path / "e.json").write_text(out[out.index("{"):out.rindex("}") + 1])
    result = json.loads((tmp_path / "e.json").read_text())
    out = cli("card", pruned, "--verify", "--src", tmp_path / "src", "--eval", tmp_path / "e.json", "--base-model", "acme/gpt-oss-tiny-pruned-src")
    assert "(verify: OK)" in out
    meta, body = front_matter((pruned / "README.md").read_text())
    assert meta["base_model"] == "acme/gpt-oss-tiny-pruned-src"
    assert re.search(r"41 tensors, [\d,]+ bytes, 0 mismatches, 0 problems -> \*\*OK\*\*", body)
    for row in result["rows"]:
        assert f"| {row['pack']} | 32 | {row['tokens']} | {row['ppl']:.4f} |" in body
    assert f"Near-lossless gates: **{'pass' if result['pass'] else 'fail'}**" in body
    assert (pruned / "README.base.md").read_text() == SOURCE_CARD


def test_card_bad_input(pruned, tmp_path):
    src = tmp_path / "src"
    out = cli("card", src, expect=2)
    assert out.startswith("error:") and "pruning.json not found" in out
    (tmp_path / "empty").mkdir()
    out = cli("card", tmp_path / "empty", expect=2)
    assert out.startswith("error:") and "no complete output" in out
    out = cli("card", pruned, "--eval", tmp_path / "none.json", expect=2)
    assert "eval result not found" in out
    for text, what in [("{nope", "not a readable JSON"), ("[1, 2]", "expected the JSON that `rewriter eval --json`"),
                       ('{"rows": [{"pack": 3}]}', "rows[0] needs a 'pack' name")]:
        (tmp_path / "bad.json").write_text(text)
        out = cli("card", pruned, "--eval", tmp_path / "bad.json", expect=2)
        assert out.startswith("error:") and what in out and "Traceback" not in out


def test_base_model_from_an_hf_source(pruned):
    import dataclasses

    from core.storage import Storage
    from rewriter.exec.publish.modelcard import render_card
    from rewriter.exec.publish.verify import load_provenance_plan

    plan = load_provenance_plan(Storage(str(pruned)))
    hub = dataclasses.replace(plan, source_url="hf://openai/gpt-oss-120b", config={**plan.config, "_name_or_path": "/x"})
    meta, body = front_matter(render_card(hub))
    assert meta["base_model"] == "openai/gpt-oss-120b" and "# gpt-oss-120b, experts pruned" in body
    local = dataclasses.replace(plan, config={**plan.config, "_name_or_path": "/models/gpt-oss"})
    assert "base_model" not in front_matter(render_card(local))[0]
