"""Model-level truth: a pruned checkpoint computes exactly what the original computes when the
dropped experts' router logits are -inf (FACTS.md, "Routing"). Real transformers models on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rewriter.tools.synth import PRESETS, write_checkpoint  # noqa: E402
from tests.conftest import cli  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def _load(path: Path, mxfp4: bool):
    from transformers import GptOssForCausalLM, Mxfp4Config

    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if mxfp4 else {}
    model = GptOssForCausalLM.from_pretrained(str(path), **kw)
    return model.eval()


def _masked_logits(model, keep: dict[str, list[int]], ids, top_k: int | None = None):
    with torch.no_grad():
        for layer, kept in keep.items():
            router = model.model.layers[int(layer)].mlp.router
            dropped = [e for e in range(router.weight.shape[0]) if e not in kept]
            router.bias[dropped] = float("-inf")
            if top_k is not None:
                router.top_k = top_k
        return model(ids).logits


def _pruned_logits(path: Path, mxfp4: bool, ids):
    with torch.no_grad():
        return _load(path, mxfp4)(ids).logits


def _bf16_model(tmp_path: Path) -> Path:
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8,
    )
    model = GptOssForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p.normal_(0, 0.05)
            layer.mlp.router.weight.normal_(0, 0.2)
            layer.mlp.router.bias.normal_(0, 0.1)
    out = tmp_path / "bf16"
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("truth")
    mx = root / "mxfp4"
    write_checkpoint(mx, PRESETS["tiny"])
    return {"mxfp4": mx, "bf16": _bf16_model(root)}


@pytest.mark.parametrize("kind", ["mxfp4", "bf16"])
@pytest.mark.parametrize("top_k", [None, 1])
def test_pruned_equals_masked_original(sources, tmp_path, kind, top_k):
    src = sources[kind]
    keep = {"0": [0, 2, 3, 6], "1": [1, 4, 5, 7]}
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    extra = ["--top-k", str(top_k)] if top_k else []
    cli("prune", src, tmp_path / "dst", "--keep-list", tmp_path / "keep.json", "--quiet", *extra)
    assert "OK" in cli("verify", src, tmp_path / "dst")
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cfg["num_local_experts"] == 4
    assert cfg["num_experts_per_tok"] == (top_k or 2)

    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 16))
    mxfp4 = kind == "mxfp4"
    want = _masked_logits(_load(src, mxfp4), keep, ids, top_k)
    got = _pruned_logits(tmp_path / "dst", mxfp4, ids)
    full = _load(src, mxfp4)(ids).logits
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    # The test can fail: pruning changes what the unmasked original computes.
    assert not torch.equal(got, full)


def test_saliency_driven_prune_loads(sources, tmp_path):
    from rewriter.tools.synth import synthetic_saliency

    synthetic_saliency(2, 8, 2, seed=4).save(tmp_path / "s.json")
    cli("prune", sources["mxfp4"], tmp_path / "dst", "--saliency", tmp_path / "s.json", "--keep-frac", "0.5",
        "--rank", "eaft_reap", "--quiet")
    keep = json.loads((tmp_path / "dst" / "pruning.json").read_text())["expert_mapping"]
    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(_pruned_logits(tmp_path / "dst", True, ids), _masked_logits(_load(sources["mxfp4"], True), keep, ids))


@pytest.mark.parametrize("top_k", [None, 1])
def test_soft_prune_equals_structural_prune(sources, tmp_path, top_k):
    src = sources["mxfp4"]
    keep = {"0": [1, 2, 4, 7], "1": [0, 3, 5, 6]}
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    extra = ["--top-k", str(top_k)] if top_k else []
    cli("soft-prune", src, tmp_path / "soft", "--keep-list", tmp_path / "keep.json", "--quiet", *extra)
    cli("prune", src, tmp_path / "hard", "--keep-list", tmp_path / "keep.json", "--quiet", *extra)
    assert "OK" in cli("verify", src, tmp_path / "soft")
    from core.checkpoint import Checkpoint

    s_ck, o_ck = Checkpoint.open(str(tmp_path / "soft")), Checkpoint.open(str(src))
    assert set(s_ck.tensors) == set(o_ck.tensors)
    assert s_ck.config["num_local_experts"] == 8
    for name, t in s_ck.tensors.items():
        a = (tmp_path / "soft" / t.shard).read_bytes()[t.begin : t.end]
        o = o_ck.tensors[name]
        b = (src / o.shard).read_bytes()[o.begin : o.end]
        assert (a == b) == (not name.endswith("router.bias")), name
    ids = torch.randint(0, 256, (2, 16))
    soft = _pruned_logits(tmp_path / "soft", True, ids)
    hard = _pruned_logits(tmp_path / "hard", True, ids)
    assert torch.isfinite(soft).all()
    assert torch.equal(soft, hard)


def test_soft_prune_refused_without_router_bias(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2)).save_pretrained(str(tmp_path / "m"))
    (tmp_path / "keep.json").write_text(json.dumps({"0": [0, 1]}))
    out = cli("soft-prune", tmp_path / "m", tmp_path / "d", "--keep-list", tmp_path / "keep.json", expect=2)
    assert "router bias" in out and "mixtral" in out


def test_synthetic_bf16_preset_loads_and_prunes(tmp_path):
    from transformers import GptOssForCausalLM

    write_checkpoint(tmp_path / "src", PRESETS["tiny-bf16"])
    src_model = GptOssForCausalLM.from_pretrained(str(tmp_path / "src")).eval()
    assert src_model.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 64, 128)
    (tmp_path / "keep.json").write_text(json.dumps({"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}))
    cli("prune", tmp_path / "src", tmp_path / "dst", "--keep-list", tmp_path / "keep.json", "--quiet")
    ids = torch.randint(0, 256, (1, 10))
    got = _pruned_logits(tmp_path / "dst", False, ids)
    want = _masked_logits(src_model, {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}, ids)
    assert torch.isfinite(got).all() and torch.equal(got, want)
