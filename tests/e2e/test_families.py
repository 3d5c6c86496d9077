"""Per-expert MoE families: prune with the CLI, verify, load, and compare logits with the original
whose dropped experts are unselectable (router logits at -inf, each family's own routing)."""

from __future__ import annotations

import contextlib
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from core.checkpoint import Checkpoint  # noqa: E402
from tests.conftest import cli  # noqa: E402
from tests.router_masks import added_to_linear  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2)

FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
                  "num_experts"),
    "qwen3_moe_unnormalized": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                               dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False),
                               "num_experts"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
                  "num_experts"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2),
                "num_local_experts"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2, eos_token_id=1,
                                                      pad_token_id=0), "num_experts"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                         moe_intermediate_size=32, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1, norm_topk_prob=True,
                         routed_scaling_factor=2.5), "n_routed_experts"),
}
# Group-balanced for DeepSeek (groups {0..3}, {4..7}: two kept in each).
KEEP = {"default": [0, 2, 5, 6], "deepseek_v3": [1, 3, 4, 6]}


def _build(name: str, path):
    cfg_cls, model_cls, kw, _ = FAMILIES[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **kw})
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n or ".gate." in n or n.endswith("gate.weight"):
                p.normal_(0, 0.2)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.uniform_(0, 0.1)
    model.save_pretrained(str(path))
    return model


@contextlib.contextmanager
def unselectable(model, keep: dict[int, list[int]], n_experts: int):
    """Router logits of dropped experts at -inf, whatever the family does with them next."""
    masks = {}
    biases = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2 or w.shape[0] != n_experts or not name.endswith("gate"):
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        m = torch.zeros(n_experts)
        m[[e for e in range(n_experts) if e not in keep[layer]]] = float("-inf")
        masks[id(w)] = m
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            biases.append((bias, bias.clone()))
            bias.data += m
    try:
        with added_to_linear(masks):
            yield
    finally:
        for b, saved in biases:
            b.data.copy_(saved)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_prunes_verifies_and_matches_masked_original(name, tmp_path):
    src = tmp_path / "src"
    model = _build(name, src)
    count_field = FAMILIES[name][3]
    family = json.loads(cli("inspect", src, "--json"))
    expected_family = {"qwen3_moe_unnormalized": "qwen3_moe"}.get(name, name)
    assert family["family"] == expected_family and family["experts_per_layer"] == 8
    moe_layers = [entry["layer"] for entry in family["layers"]]
    assert moe_layers == ([1, 2] if name == "deepseek_v3" else [0, 1, 2])
    ids = KEEP.get(name, KEEP["default"])
    keep = {layer: ids for layer in moe_layers}
    (tmp_path / "keep.json").write_text(json.dumps({str(k): v for k, v in keep.items()}))
    cli("prune", src, tmp_path / "dst", "--keep-list", tmp_path / "keep.json", "--quiet")
    assert "OK" in cli("verify", src, tmp_path / "dst")
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    counts = [cfg[f] for f in (count_field, "num_local_experts", "num_experts") if f in cfg]
    assert counts and set(counts) == {4}
    dst = Checkpoint.open(str(tmp_path / "dst"))
    names = set(dst.tensors)
    prefix = "block_sparse_moe" if name == "mixtral" else "mlp"
    layer = moe_layers[-1]
    assert any(f"layers.{layer}.{prefix}.experts.3." in n for n in names)
    assert not any(f"layers.{layer}.{prefix}.experts.4." in n for n in names)
    src_ckpt = Checkpoint.open(str(src))
    # Renumbered in order: new expert 2 is original expert ids[2].
    for n in names:
        if f"layers.{layer}.{prefix}.experts.2." in n:
            orig = n.replace("experts.2.", f"experts.{ids[2]}.")
            with open(src / src_ckpt.tensors[orig].shard, "rb") as f, open(tmp_path / "dst" / dst.tensors[n].shard, "rb") as g:
                f.seek(src_ckpt.tensors[orig].begin)
                g.seek(dst.tensors[n].begin)
                assert f.read(dst.tensors[n].nbytes) == g.read(dst.tensors[n].nbytes)
    if name == "qwen2_moe":
        assert any("shared_expert." in n for n in names) and any("shared_expert_gate" in n for n in names)
    if name == "deepseek_v3":
        assert dst.tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"].shape == (4,)
        assert any("layers.0.mlp.gate_proj" in n for n in names)  # dense layer untouched

    pruned = getattr(transformers, FAMILIES[name][1]).from_pretrained(str(tmp_path / "dst")).float().eval()
    torch.manual_seed(1)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        got = pruned(x).logits
        full = model(x).logits
        with unselectable(model, keep, 8):
            want = model(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-4)


def test_deepseek_group_balance_is_enforced(tmp_path):
    src = tmp_path / "src"
    _build("deepseek_v3", src)
    (tmp_path / "keep.json").write_text(json.dumps({"1": [0, 1, 2, 4], "2": [0, 1, 2, 4]}))
    out = cli("plan", src, "--keep-list", tmp_path / "keep.json", expect=2)
    assert "same number in every group" in out
    from rewriter.tools.synth import synthetic_saliency

    s = synthetic_saliency(3, 8, 2).to_json()
    s["layers"] = {k: v for k, v in s["layers"].items() if k in ("1", "2")}
    (tmp_path / "s.json").write_text(json.dumps(s))
    out = cli("plan", src, "--saliency", tmp_path / "s.json", "--keep-n", "3", expect=2)
    assert "not divisible by n_group = 2" in out
    out = cli("plan", src, "--saliency", tmp_path / "s.json", "--keep-n", "2", "--top-k", "1", expect=2)
    assert "two best experts" in out
    cli("plan", src, "--saliency", tmp_path / "s.json", "--keep-n", "4", "--out", tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    for ids in plan["expert_mapping"].values():
        assert sum(e < 4 for e in ids) == 2 == sum(e >= 4 for e in ids)


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_profiler_hooks_for_family(name, tmp_path):
    """Frequency and REAP from the observer equal a recomputation with the module's eager forward,
    one (token, expert) pair at a time."""
    import numpy as np

    from profiling.observer import ExpertObserver
    from profiling.profile import profile_model

    model = _build(name, tmp_path / "m")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 128, 16) for _ in range(3)]
    captured: dict[int, list] = {}
    modules = ExpertObserver(model).experts_modules()
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: captured.setdefault(i, []).append(
        tuple(a.detach().clone() for a in args))) for i, m in modules]
    with torch.no_grad():
        for s in seqs:
            model(torch.as_tensor(s)[None])
    for h in hooks:
        h.remove()
    got, _ = profile_model(model, seqs, batch_size=1, spill_dir=str(tmp_path / "spill"))
    for i, experts in modules:
        n = experts.num_experts
        freq, reap_sum = np.zeros(n), np.zeros(n)
        saved = experts.config._experts_implementation
        experts.config._experts_implementation = "eager"
        with torch.no_grad():
            for hidden, idx, w in captured[i]:
                for t in range(hidden.shape[0]):
                    for j in range(idx.shape[1]):
                        e = int(idx[t, j])
                        f = experts(hidden[t : t + 1], idx[t : t + 1, j : j + 1], torch.ones(1, 1, dtype=w.dtype))
                        freq[e] += 1
                        reap_sum[e] += float(w[t, j]) * float(f.double().norm())
        experts.config._experts_implementation = saved
        reap = np.divide(reap_sum, freq, out=np.zeros(n), where=freq > 0)
        assert np.array_equal(np.array(got[i]["freq"]), freq)
        np.testing.assert_allclose(got[i]["reap"], reap, rtol=1e-4, atol=1e-6)


def test_profile_prune_load_qwen3(tmp_path):
    src = tmp_path / "src"
    _build("qwen3_moe", src)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input_ids": list(range(i, i + 40))}) + "\n" for i in range(0, 80, 5)))
    cli("profile", src, "--data", data, "--out", tmp_path / "s.json", "--seq-len", "32", "--device", "cpu", "--quiet")
    sal = json.loads((tmp_path / "s.json").read_text())
    assert sal["model"]["family"] == "qwen3_moe" and set(sal["layers"]) == {"0", "1", "2"}
    cli("prune", src, tmp_path / "dst", "--saliency", tmp_path / "s.json", "--keep-n", "4", "--rank", "reap", "--quiet")
    m = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tmp_path / "dst"))
    assert m.config.num_experts == 4


def test_deepseek_soft_prune_equals_structural(tmp_path):
    src = tmp_path / "src"
    _build("deepseek_v3", src)
    keep = {"1": [1, 3, 4, 6], "2": [0, 2, 5, 7]}
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    cli("soft-prune", src, tmp_path / "soft", "--keep-list", tmp_path / "keep.json", "--quiet")
    cli("prune", src, tmp_path / "hard", "--keep-list", tmp_path / "keep.json", "--quiet")
    assert "OK" in cli("verify", src, tmp_path / "soft")
    cls = transformers.DeepseekV3ForCausalLM
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        soft = cls.from_pretrained(str(tmp_path / "soft")).float()(x).logits
        hard = cls.from_pretrained(str(tmp_path / "hard")).float()(x).logits
    torch.testing.assert_close(soft, hard, rtol=1e-5, atol=1e-5)


def test_fp8_expert_scales_move_with_their_weights(tmp_path):
    """A DeepSeek/GLM-style FP8 checkpoint, written header by header: per-expert weight and
    weight_scale_inv tensors are kept, renamed and dropped together; the router bias is sliced."""
    from core.format import encode_header, nbytes_of

    items = [("model.layers.0.mlp.gate.weight", "BF16", (8, 16)),
             ("model.layers.0.mlp.gate.e_score_correction_bias", "F32", (8,)),
             ("model.layers.0.mlp.shared_experts.up_proj.weight", "F8_E4M3", (32, 16))]
    for e in range(8):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            items += [(f"model.layers.0.mlp.experts.{e}.{proj}.weight", "F8_E4M3", (32, 16)),
                      (f"model.layers.0.mlp.experts.{e}.{proj}.weight_scale_inv", "F32", (1, 1))]
    src = tmp_path / "src"
    src.mkdir()
    head = encode_header(items)
    data = bytearray()
    for i, (_, dtype, shape) in enumerate(items):
        data += bytes([i % 251]) * nbytes_of(dtype, shape)
    (src / "model.safetensors").write_bytes(head + bytes(data))
    (src / "config.json").write_text(json.dumps({"model_type": "glm4_moe", "n_routed_experts": 8,
                                                 "num_experts_per_tok": 2, "n_group": 2, "topk_group": 2}))
    info = json.loads(cli("inspect", src, "--json"))
    assert info["family"] == "deepseek_v3" and info["experts_per_layer"] == 8
    (tmp_path / "keep.json").write_text(json.dumps({"0": [1, 2, 5, 7]}))
    cli("prune", src, tmp_path / "dst", "--keep-list", tmp_path / "keep.json", "--quiet")
    assert "OK" in cli("verify", src, tmp_path / "dst")
    dst = Checkpoint.open(str(tmp_path / "dst"))
    assert {n for n in dst.tensors if "experts." in n and "shared" not in n} == {
        f"model.layers.0.mlp.experts.{e}.{p}.{k}" for e in range(4)
        for p in ("gate_proj", "up_proj", "down_proj") for k in ("weight", "weight_scale_inv")}
    assert dst.tensors["model.layers.0.mlp.gate.e_score_correction_bias"].shape == (4,)
    assert "model.layers.0.mlp.shared_experts.up_proj.weight" in dst.tensors
    s = Checkpoint.open(str(src))
    for new, old in enumerate([1, 2, 5, 7]):
        for k in ("weight", "weight_scale_inv"):
            a = dst.tensors[f"model.layers.0.mlp.experts.{new}.down_proj.{k}"]
            b = s.tensors[f"model.layers.0.mlp.experts.{old}.down_proj.{k}"]
            assert (tmp_path / "dst" / a.shard).read_bytes()[a.begin:a.end] == (src / b.shard).read_bytes()[b.begin:b.end]
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["n_routed_experts"] == 4
