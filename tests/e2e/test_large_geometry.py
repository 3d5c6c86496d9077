"""The largest public MoE models' geometries (``synth --preset``): their headers match the published
releases, ``--sparse`` costs only the headers, and a DeepSeek-V3-architecture checkpoint of
thousands of per-expert tensors goes through plan, run, verify and a killed-and-resumed run."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from core.checkpoint import Checkpoint
from core.format import nbytes_of
from planners.saliency import model_identity
from rewriter.tools.synth import synthetic_saliency
from rewriter.tools.synth_moe import MOE_PRESETS, all_tensors, shard_assignment
from tests.conftest import cli, tree_digest

#: (tensors, shards, experts per layer, MoE layers incl. MTP) of each release's index, as
#: docs/geometries.md gives them.
PUBLISHED = {
    "deepseek-v3": (91_991, 163, 256, 59),
    "kimi-k2": (139_583, 62, 384, 60),
    "qwen3-235b": (36_945, 118, 128, 94),
    "qwen3-coder-480b": (30_321, 241, 160, 62),
    "glm-4.5": (44_691, 93, 160, 90),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_have_the_published_tensor_and_shard_counts(name):
    g = MOE_PRESETS[name]
    tensors, shards, experts, moe = PUBLISHED[name]
    assert len(all_tensors(g)) == tensors
    assigned = shard_assignment(g)
    assert len(assigned) == shards
    assert sorted(n for grp in assigned.values() for n, _, _ in grp) == sorted(n for n, _, _ in all_tensors(g))
    routers = [n for n, _, _ in all_tensors(g) if n.endswith("mlp.gate.weight")]
    assert len(routers) == moe and g.num_experts == experts


def test_fp8_releases_carry_one_block_scale_per_128x128_tile():
    items = {n: (d, s) for n, d, s in all_tensors(MOE_PRESETS["deepseek-v3"])}
    assert items["model.layers.3.mlp.experts.255.down_proj.weight"] == ("F8_E4M3", (7168, 2048))
    assert items["model.layers.3.mlp.experts.255.down_proj.weight_scale_inv"] == ("F32", (56, 16))
    assert items["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == ("F32", (5, 56))
    # The MTP module (layer 61) is an MoE layer with its own projection and copies of embed and head.
    assert items["model.layers.61.eh_proj.weight"] == ("BF16", (7168, 14336))
    assert "model.layers.61.mlp.experts.0.up_proj.weight" in items
    qwen = {n: d for n, d, _ in all_tensors(MOE_PRESETS["qwen3-235b"])}
    assert set(qwen.values()) == {"BF16"} and not any("scale_inv" in n for n in qwen)


@pytest.mark.slow
def test_sparse_full_deepseek_v3_is_its_headers_on_disk(tmp_path):
    out = tmp_path / "dsv3"
    cli("synth", "--preset", "deepseek-v3", "--sparse", "--quiet", out)
    c = Checkpoint.open(str(out))
    assert len(c.tensors) == 91_991 and len(c.shards) == 163
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = sum(nbytes_of(d, s) for _, d, s in all_tensors(MOE_PRESETS["deepseek-v3"]))
    assert index["metadata"]["total_size"] == total == sum(t.nbytes for t in c.tensors.values())
    assert 688e9 < total < 689e9
    on_disk = sum(p.stat().st_blocks * 512 for p in out.iterdir())
    assert on_disk < 64 << 20, f"{on_disk:,} bytes on disk for a sparse checkpoint"
    assert sorted(c.layout.moe_layers(c)) == list(range(3, 62))


def test_layers_keep_the_dense_first_and_mtp_rules(tmp_path):
    out = tmp_path / "k"
    cli("synth", "--preset", "deepseek-v3", "--sparse", "--layers", "2", "--quiet", out)
    info = json.loads(cli("inspect", out, "--json"))
    # Three dense layers do not fit two: one dense layer, one MoE layer, then the MTP layer 2.
    assert [e["layer"] for e in info["layers"]] == [1, 2] and info["mtp_layers"] == {"2": 1}
    config = json.loads((out / "config.json").read_text())
    assert config["first_k_dense_replace"] == 1 and config["num_hidden_layers"] == 2


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("mini") / "src"
    cli("synth", "--preset", "deepseek-v3-mini", "--quiet", src)
    return src


def _saliency(src: Path, path: Path, layers: list[int]) -> Path:
    c = Checkpoint.open(str(src))
    s = synthetic_saliency(len(layers), 128, 8, model=model_identity(c), seed=3)
    dataclasses.replace(s, layers={layer: s.layers[i] for i, layer in enumerate(layers)}).save(path)
    return path


def test_mtp_layer_without_saliency_takes_the_keep_set_of_the_layer_it_follows(mini, tmp_path):
    sal = _saliency(mini, tmp_path / "s.json", [1, 2, 3])  # a profile: transformers never runs layer 4
    plan = tmp_path / "p.json"
    out = cli("plan", mini, "--saliency", sal, "--keep-frac", "0.5", "--out", plan)
    assert ("note: layer 4 is a multi-token-prediction layer with no keep set of its own (transformers does "
            "not run it, so no profile scores it); it took the keep set of layer 3") in out
    doc = json.loads(plan.read_text())
    assert doc["expert_mapping"]["4"] == doc["expert_mapping"]["3"] and len(doc["expert_mapping"]["4"]) == 64
    assert doc["provenance"]["mtp_follows"] == {"4": 3}


def test_thousands_of_per_expert_tensors_plan_run_verify_and_resume(mini, tmp_path):
    from tests.e2e.test_promises import at_file_operation

    assert len(Checkpoint.open(str(mini)).tensors) == 3_189
    sal = _saliency(mini, tmp_path / "s.json", [1, 2, 3, 4])
    plan = tmp_path / "p.json"
    cli("plan", mini, "--saliency", sal, "--keep-frac", "0.5", "--max-shard-size", "400KB", "--out", plan)
    ref = tmp_path / "ref"
    cli("run", plan, "--out", ref, "--quiet")
    expected = tree_digest(ref)
    shards = [n for n in expected if n.endswith(".safetensors")]
    assert len(shards) >= 4
    assert "mismatches: 0, problems: 0 -> OK" in cli("verify", mini, ref)
    assert len(Checkpoint.open(str(ref)).tensors) == 1_653  # 64 of 128 experts kept in 4 MoE layers
    dst = tmp_path / "killed"
    r = at_file_operation(dst, "kill", "rename:journal.json#2>open:*.safetensors.part#1",
                          ["run", plan, "--out", dst, "--quiet"])
    assert r.returncode == -9, r.stderr
    assert 0 < len(list(dst.glob("*.safetensors"))) < len(shards)
    assert not (dst / "model.safetensors.index.json").exists()
    cli("run", plan, "--out", dst, "--quiet")
    assert tree_digest(dst) == expected
    assert not os.path.exists(dst / ".rewriter")
