"""Every MoE model type of the installed transformers: supported with model-level truth, or
refused with a reason. A tiny model of each supported type is built from its own classes, saved,
pruned with the CLI, verified, loaded with ``from_pretrained`` and compared with the original
whose dropped experts are unselectable. The committed results (``docs/families.json``) are what
the README's families table is rendered from; each truth test checks its own row."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pytest

from core.families import LAYOUTS, REFUSED
from tests.conftest import REPO, cli
from tests.router_masks import added_to_linear

RESULTS = REPO / "docs" / "families.json"
#: Kept experts of 8: two in each half, so group-limited routing (2 groups) stays balanced.
KEEP = [1, 3, 4, 6]
SUPPORTED = {t: lay for lay in LAYOUTS for t in lay.model_types}


def committed() -> dict[str, dict]:
    return {row["model_type"]: row for row in json.loads(RESULTS.read_text())["families"]}


def test_every_moe_model_type_of_transformers_is_supported_or_refused():
    pytest.importorskip("transformers")
    from tests.moe_catalog import moe_model_types, unjudged_model_types

    found = set(moe_model_types()) | set(unjudged_model_types())
    unknown = sorted(found - set(SUPPORTED) - set(REFUSED))
    assert unknown == [], f"MoE model types of this transformers with no description and no refusal: {unknown}"
    rows = committed()
    assert sorted(found - set(rows)) == [], "model types missing from docs/families.json"
    assert sum(rows[t]["status"] == "supported" for t in found) >= 50


def test_readme_table_is_rendered_from_the_results():
    from tests.families_table import render, replace_table

    readme = (REPO / "README.md").read_text()
    assert replace_table(readme, render(json.loads(RESULTS.read_text()))) == readme


def test_refused_types_are_refused_at_inspect_with_their_reason(tmp_path):
    from core.format import encode_header

    for model_type, reason in sorted(REFUSED.items()):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "num_experts": 8,
                                                          "architectures": ["Glm4MoeForCausalLM"]}))
        (tmp_path / "model.safetensors").write_bytes(encode_header([]))
        out = cli("inspect", tmp_path, expect=2)
        assert out.startswith("error: ") and f"is refused because {reason}" in out.replace("\n", " ")
        assert 'found config fields {"num_experts": 8}, no expert or router tensor' in out.replace("\n", " ")


def _header_only(path: Path, config: dict, names: list[str]) -> None:
    from core.format import encode_header

    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    header = encode_header([(n, "F32", [8, 4]) for n in names])
    (path / "model.safetensors").write_bytes(header + bytes(4 * 32 * len(names)))


def test_inspect_of_an_unknown_moe_type_names_the_fields_and_tensors_found_and_what_is_missing(tmp_path):
    names = [f"model.layers.0.moe.w{i}.{e}" for e in range(8) for i in (1, 2)] + ["model.layers.0.moe.router"]
    _header_only(tmp_path, {"model_type": "new_moe", "num_local_experts": 8, "moe_topk": 2}, names)
    out = cli("inspect", tmp_path, expect=2).replace("\n", " ")
    assert out.startswith("error: ") and "'new_moe'" in out and "not a supported MoE family" in out
    assert 'found config fields {"num_local_experts": 8, "moe_topk": 2}, 17 expert or router tensors' in out
    assert "model.layers.0.moe.router" in out and "missing is a description of its expert tensor names" in out


def test_inspect_says_supported_with_the_fields_and_tensors_it_rests_on(tiny):
    text = cli("inspect", tiny)
    assert "status:            supported: family gpt_oss (model_type gpt_oss)" in text
    assert "num_local_experts=8" in text and "num_experts_per_tok=" in text
    info = json.loads(cli("inspect", tiny, "--json"))
    assert info["status"] == "supported" and info["config_fields"]["num_local_experts"] == 8
    # 2 MoE layers: 6 fused expert tensors and 2 router tensors each.
    assert info["expert_tensors"] == {"fused": 12, "router": 4} and info["mtp_layers"] == {}


def router_layer(layout, name: str, t) -> int | None:
    """The layer of a router tensor of the model: by the layout's disk names, or, where the
    model's own names differ from what it saves, by a router/gate name and an expert-sized dim."""
    role = layout.classify(name)
    if role is not None:
        return role.layer if role.role == "router" else None
    m = re.search(r"layers\.(\d+)\.(.*)", name)
    if m is None or "experts" in m.group(2) or t.dim() > 2 or not re.search(r"gate|router", m.group(2)):
        return None
    leaf = name.rsplit(".", 1)[-1]
    sized = t.shape[0] == 8 or (t.dim() == 2 and t.shape[0] == 1 and t.shape[1] == 8)
    return int(m.group(1)) if sized and (leaf == "weight" or "bias" in leaf) else None


@contextlib.contextmanager
def unselectable(model, layout, keep: list[int]):
    """Router outputs of dropped experts at -inf: router weights through ``F.linear``, selection
    biases directly. Yields the MoE layers it masked."""
    import torch

    masks, saved, layers = {}, [], set()
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in named:
        layer = router_layer(layout, name, t)
        if layer is None:
            continue
        layers.add(layer)
        m = torch.zeros(t.shape[-1] if t.dim() == 2 and t.shape[0] == 1 else t.shape[0])
        m[[e for e in range(m.shape[0]) if e not in keep]] = float("-inf")
        if name.endswith("weight") and t.dim() == 2 and t.shape[0] > 1:
            masks[id(t)] = m
        elif "bias" in name.rsplit(".", 1)[-1]:  # selection biases; per-expert scales stay as they are
            saved.append((t, t.detach().clone()))
            t.data += m.view(t.shape).to(t.dtype)
    try:
        with added_to_linear(masks):
            yield layers
    finally:
        for t, v in saved:
            t.data.copy_(v)


def truth(model_type: str, tmp_path: Path) -> dict:
    """Prune a tiny model of ``model_type`` with the CLI; the largest logit difference from the
    masked original, and what was checked on the way."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from tests.moe_catalog import build

    src, dst = tmp_path / "src", tmp_path / "dst"
    model = build(model_type, str(src))
    layout = SUPPORTED[model_type]
    info = json.loads(cli("inspect", src, "--json"))
    assert info["family"] == layout.family and info["experts_per_layer"] == 8
    moe = [entry["layer"] for entry in info["layers"]]
    (tmp_path / "keep.json").write_text(json.dumps({str(i): KEEP for i in moe}))
    cli("prune", src, dst, "--keep-list", tmp_path / "keep.json", "--quiet")
    assert "OK" in cli("verify", src, dst)
    # Which serving engines' load rules the output passes (transformers then loads it for real).
    verdicts = json.loads(cli("check", dst, "--json", expect=None))["verdicts"]
    failed = {v["target"] for v in verdicts if v["status"] == "fail"}
    targets = sorted({v["target"] for v in verdicts} - failed)
    assert "transformers" in targets, [v for v in verdicts if v["target"] == "transformers"]
    pruned = AutoModelForCausalLM.from_pretrained(str(dst)).float().eval()
    torch.manual_seed(1)
    x = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        got, full = pruned(x).logits, model(x).logits
        with unselectable(model, layout, KEEP) as masked:
            want = model(x).logits
    assert masked == set(moe), f"masked layers {sorted(masked)}, MoE layers {moe}"
    diff = float((got - want).abs().max())
    changed = float((got - full).abs().max())
    return {"model_type": model_type, "family": layout.family, "moe_layers": len(moe), "max_diff": diff,
            "changed": changed, "targets": targets}


@pytest.mark.slow
@pytest.mark.torch
# The suite runs the types the committed results claim; `make families-table` (which sets
# REWRITER_FAMILY_RESULTS) runs every described type, so newly passing ones join the table.
@pytest.mark.parametrize("model_type", sorted(SUPPORTED) if os.environ.get("REWRITER_FAMILY_RESULTS") else
                         sorted(t for t, row in committed().items() if row["status"] == "supported"))
def test_pruned_model_equals_masked_original(model_type, tmp_path):
    pytest.importorskip("transformers")
    result = truth(model_type, tmp_path)
    assert result["max_diff"] <= 1e-5, result
    assert result["changed"] > 1e-4, "pruning changed nothing: the comparison could not fail"
    out = os.environ.get("REWRITER_FAMILY_RESULTS")
    if out:  # only what passed reaches the results the README table is rendered from
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
    if not out:
        assert committed()[model_type]["status"] == "supported"


def test_check_reads_the_family_own_count_and_topk_fields(tmp_path):
    """ERNIE states its count and top-k only as moe_num_experts / moe_k: check must read them."""
    names = [f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(8)] + ["model.layers.0.mlp.gate.weight"]
    _header_only(tmp_path, {"model_type": "ernie4_5_moe", "moe_num_experts": 8, "moe_k": 2}, names)
    out = cli("check", tmp_path, "--target", "transformers")
    assert "moe_num_experts = 8" in out and "moe_k = 2" in out and "-> OK" in out
    _header_only(tmp_path, {"model_type": "ernie4_5_moe", "moe_num_experts": 6, "moe_k": 2}, names)
    out = cli("check", tmp_path, "--target", "transformers", expect=1)
    assert "moe_num_experts = 6, but the tensors hold 8 experts per layer" in out


def test_config_layer_fields_must_agree_with_where_the_experts_are(tmp_path):
    """decoder_sparse_step 2 makes layer 1 the MoE layer; experts stored in layer 0 would not load."""
    names = [f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(8)] + ["model.layers.0.mlp.gate.weight"]
    config = {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2}
    _header_only(tmp_path, {**config, "decoder_sparse_step": 1}, names)
    out = cli("inspect", tmp_path, expect=2)  # both layers are MoE layers by the config; layer 1 has no experts
    assert "decoder_sparse_step make layers [0, 1] MoE layers" in out.replace("\n", " ")
    _header_only(tmp_path, {**config, "decoder_sparse_step": 2}, names)
    out = cli("inspect", tmp_path, expect=2).replace("\n", " ")
    assert out.startswith("error: ") and "decoder_sparse_step make layers [1] MoE layers" in out
    assert "expert tensors are in layers [0]" in out
    _header_only(tmp_path, {**config, "mlp_layer_types": ["sparse", "dense"], "decoder_sparse_step": 2}, names)
    assert json.loads(cli("inspect", tmp_path, "--json"))["moe_layers"] == 1  # mlp_layer_types decides


def test_a_per_layer_count_list_with_different_counts_is_refused_naming_it(tmp_path):
    names = [f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(8)] + ["model.layers.0.mlp.gate.wg.weight"]
    _header_only(tmp_path, {"model_type": "hunyuan_v1_moe", "num_experts": [8, 6], "moe_topk": 2}, names)
    out = cli("inspect", tmp_path, expect=2)
    assert "num_experts is a per-layer list with different counts ([6, 8])" in out.replace("\n", " ")
    _header_only(tmp_path, {"model_type": "hunyuan_v1_moe", "num_experts": [8, 8], "moe_topk": [2, 1]}, names)
    info = json.loads(cli("inspect", tmp_path, "--json"))
    assert info["experts_per_layer"] == 8 and info["top_k"] == 2


@pytest.mark.slow
@pytest.mark.torch
def test_a_per_layer_topk_list_keeps_its_form_and_the_output_loads(tmp_path):
    """Hunyuan's moe_topk may be a per-layer list: the count is set, the list kept (or lowered whole)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from tests.moe_catalog import tiny_config

    config = tiny_config("hunyuan_v1_moe")
    config.moe_topk = [2, 2, 2]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "expert" in name or "gate" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "keep.json").write_text(json.dumps({str(i): KEEP for i in range(3)}))
    cli("prune", tmp_path / "src", tmp_path / "dst", "--keep-list", tmp_path / "keep.json", "--quiet")
    out = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert out["num_experts"] == 4 and out["moe_topk"] == [2, 2, 2]
    assert "-> OK" in cli("check", tmp_path / "dst", "--target", "transformers")
    pruned = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dst")).float().eval()
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), unselectable(model, SUPPORTED["hunyuan_v1_moe"], KEEP):
        want = model(x).logits
    with torch.no_grad():
        assert float((pruned(x).logits - want).abs().max()) <= 1e-5
    cli("prune", tmp_path / "src", tmp_path / "dst1", "--keep-list", tmp_path / "keep.json", "--top-k", "1", "--quiet")
    assert json.loads((tmp_path / "dst1" / "config.json").read_text())["moe_topk"] == [1, 1, 1]
