"""Multi-token-prediction layers (``num_nextn_predict_layers``, DeepSeek-V3 / GLM-4.5 style): real
checkpoints ship layer ``num_hidden_layers`` with its own experts, which transformers does not
load. A tiny deepseek_v3 saved by transformers gets such a layer appended; its experts are pruned
with the keep set of the last MoE decoder layer unless a keep list gives its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.e2e.test_every_family import KEEP, SUPPORTED, unselectable

pytestmark = [pytest.mark.torch, pytest.mark.slow]

MTP = 3  # num_hidden_layers of the tiny model: the MTP layer's number


@pytest.fixture(scope="module")
def with_mtp(tmp_path_factory) -> tuple[Path, object]:
    """A tiny deepseek_v3 (MoE layers 1 and 2) plus MTP layer 3: layer 2's tensors with other
    values, and the MTP-only projections and norms."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from tests.moe_catalog import build

    src = tmp_path_factory.mktemp("mtp") / "src"
    model = build("deepseek_v3", str(src))
    tensors = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    for name, t in list(tensors.items()):
        if name.startswith("model.layers.2."):
            tensors[name.replace("layers.2.", f"layers.{MTP}.")] = torch.randn(t.shape, generator=gen).to(t.dtype)
    # As DeepSeek-V3's README_WEIGHTS describes the MTP module: its own norms and projection, and
    # copies of the embedding and output head.
    for name, shape in (("eh_proj.weight", (32, 64)), ("enorm.weight", (32,)), ("hnorm.weight", (32,)),
                        ("shared_head.norm.weight", (32,)), ("embed_tokens.weight", (128, 32)),
                        ("shared_head.head.weight", (128, 32))):
        tensors[f"model.layers.{MTP}.{name}"] = torch.randn(shape, generator=gen)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    assert config["num_hidden_layers"] == MTP
    (src / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return src, model


def _prune(src: Path, out: Path, keep: dict[int, list[int]]) -> Path:
    (out.parent / f"{out.name}.keep.json").write_text(json.dumps({str(k): v for k, v in keep.items()}))
    cli("prune", src, out, "--keep-list", out.parent / f"{out.name}.keep.json", "--quiet")
    assert "OK" in cli("verify", src, out)
    return out


def test_mtp_layer_is_an_moe_layer_at_inspect(with_mtp):
    src, _ = with_mtp
    info = json.loads(cli("inspect", src, "--json"))
    assert [e["layer"] for e in info["layers"]] == [1, 2, MTP]
    assert info["mtp_layers"] == {str(MTP): 2} and info["config_fields"]["num_nextn_predict_layers"] == 1
    assert f"MTP layers:        layer {MTP} (keep set of layer 2 unless given)" in cli("inspect", src)


def test_qwen_style_mtp_expert_tensors_are_refused_naming_the_tensor(tmp_path):
    from tests.e2e.test_every_family import _header_only

    names = [f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(8)] + ["model.layers.0.mlp.gate.weight",
                                                                                    "mtp.layers.0.mlp.experts.0.up_proj.weight"]
    _header_only(tmp_path, {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                            "num_hidden_layers": 1}, names)
    out = cli("inspect", tmp_path, expect=2).replace("\n", " ")
    assert out.startswith("error: ") and "'mtp.layers.0.mlp.experts.0.up_proj.weight'" in out
    assert "multi-token-prediction" in out and "decoder layer 0" in out


def test_mtp_experts_take_the_keep_set_of_the_layer_they_follow(with_mtp, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src, model = with_mtp
    dst = _prune(src, tmp_path / "dst", {1: KEEP, 2: KEEP})
    before, after = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    p = f"model.layers.{MTP}.mlp."
    for new, old in enumerate(KEEP):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(after[f"{p}experts.{new}.{proj}.weight"], before[f"{p}experts.{old}.{proj}.weight"])
    assert f"{p}experts.{len(KEEP)}.gate_proj.weight" not in after
    assert torch.equal(after[f"{p}gate.weight"], before[f"{p}gate.weight"][KEEP])
    assert torch.equal(after[f"{p}gate.e_score_correction_bias"], before[f"{p}gate.e_score_correction_bias"][KEEP])
    for name in ("eh_proj.weight", "enorm.weight", "mlp.shared_experts.down_proj.weight"):
        assert torch.equal(after[f"model.layers.{MTP}.{name}"], before[f"model.layers.{MTP}.{name}"])
    config = json.loads((dst / "config.json").read_text())
    assert config["n_routed_experts"] == len(KEEP) and config["num_nextn_predict_layers"] == 1
    # transformers loads the output (it leaves the MTP layer out) and matches the masked original.
    pruned = AutoModelForCausalLM.from_pretrained(str(dst)).float().eval()
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), unselectable(model, SUPPORTED["deepseek_v3"], KEEP):
        want = model(x).logits
    with torch.no_grad():
        assert float((pruned(x).logits - want).abs().max()) <= 1e-5


def test_a_keep_list_may_give_the_mtp_layer_its_own_set(with_mtp, tmp_path):
    src, _ = with_mtp
    own = [0, 2, 5, 7]
    dst = _prune(src, tmp_path / "dst", {1: KEEP, 2: KEEP, MTP: own})
    plan_mapping = json.loads((dst / "pruning.json").read_text())["expert_mapping"]
    assert plan_mapping[str(MTP)] == own and plan_mapping["2"] == KEEP


def test_saliency_without_the_mtp_layer_plans_it_as_the_layer_it_follows(with_mtp, tmp_path):
    src, _ = with_mtp
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal, "--domain", "d")
    doc = json.loads(sal.read_text())
    del doc["layers"][str(MTP)]  # what a profile of the transformers model writes: no MTP layer
    sal.write_text(json.dumps(doc))
    out = cli("plan", src, "--saliency", sal, "--keep-n", "4", "--out", tmp_path / "plan.json")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["expert_mapping"][str(MTP)] == plan["expert_mapping"]["2"]
    assert plan["provenance"]["mtp_follows"] == {str(MTP): 2}
    assert f"layer {MTP} is a multi-token-prediction layer" in out and "took the keep set of layer 2" in out


def test_a_saliency_file_missing_a_decoder_layer_is_still_refused(with_mtp, tmp_path):
    src, _ = with_mtp
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal, "--domain", "d")
    doc = json.loads(sal.read_text())
    del doc["layers"]["1"]
    sal.write_text(json.dumps(doc))
    out = cli("plan", src, "--saliency", sal, "--keep-n", "4", "--out", tmp_path / "plan.json", expect=2)
    assert out.startswith("error: ") and "missing [1]" in out
