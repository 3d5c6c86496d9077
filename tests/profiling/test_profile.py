"""The profiler against a brute-force recomputation on a tiny random gpt-oss (CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from profiling.data import ByteTokenizer, documents, pack  # noqa: E402
from profiling.profile import profile_model  # noqa: E402
from profiling.stats import eaft_weights, exact_percentile  # noqa: E402
from tests.conftest import cli  # noqa: E402

pytestmark = pytest.mark.torch


def _model():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                       num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    model = GptOssForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.normal_(0, 0.1)
            layer.mlp.experts.down_proj.normal_(0, 0.1)
            layer.mlp.router.weight.normal_(0, 0.3)
        model.lm_head.weight.normal_(0, 0.5)
    return model


def _brute_force(model, seqs: list[np.ndarray]):
    """Explicit per-token loops over routed experts, straight from the definitions."""
    n_layers = len(model.model.layers)
    n_exp = model.config.num_local_experts
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].detach()))
             for i, layer in enumerate(model.model.layers)]
    freq = np.zeros((n_layers, n_exp))
    reap_sum = np.zeros((n_layers, n_exp))
    max_norm = np.zeros((n_layers, n_exp))
    pairs = []  # (token global index, layer, expert, contribution)
    ps, hs = [], []
    base = 0
    with torch.no_grad():
        for seq in seqs:
            ids = torch.as_tensor(seq)[None]
            logits = model(ids).logits[0].double()
            for t in range(len(seq)):
                if t + 1 < len(seq):
                    prob = torch.softmax(logits[t], -1)
                    ps.append(float(prob[seq[t + 1]]))
                    top = torch.topk(logits[t], 20).values
                    q = torch.softmax(top, -1)
                    hs.append(float(-(q * q.log()).sum() / math.log(20)))
                else:
                    ps.append(float("nan"))
                    hs.append(float("nan"))
            for li, layer in enumerate(model.model.layers):
                x = captured[li][0]
                router = layer.mlp.router
                experts = layer.mlp.experts
                for t in range(x.shape[0]):
                    rl = x[t] @ router.weight.T + router.bias
                    vals, idx = torch.topk(rl, router.top_k)
                    g = torch.softmax(vals, -1)
                    for j in range(router.top_k):
                        e = int(idx[j])
                        gu = x[t] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
                        f = experts._apply_gate(gu) @ experts.down_proj[e] + experts.down_proj_bias[e]
                        c = float(g[j]) * float(f.double().norm())
                        max_norm[li, e] = max(max_norm[li, e], float(f.double().norm()))
                        freq[li, e] += 1
                        reap_sum[li, e] += c
                        pairs.append((base + t, li, e, c))
            base += len(seq)
    for h in hooks:
        h.remove()
    p, hh = np.array(ps), np.array(hs)
    valid = ~np.isnan(p)
    p_lo, h_lo = np.percentile(p[valid], 15), np.percentile(hh[valid], 15)
    eaft = np.zeros((n_layers, n_exp))
    for tok, li, e, c in pairs:
        if not valid[tok]:
            continue
        if hh[tok] <= h_lo:
            w = 1.0 if p[tok] >= p_lo else -2.0
        else:
            w = 0.25
        eaft[li, e] += w * c
    reap = np.divide(reap_sum, freq, out=np.zeros_like(reap_sum), where=freq > 0)
    _brute_force.max_norm = max_norm  # type: ignore[attr-defined]
    return freq, reap, eaft, p_lo, h_lo


@pytest.mark.parametrize("strategy", ["grouped", "loop"])
def test_hook_statistics_equal_brute_force(tmp_path, monkeypatch, strategy):
    import profiling.observer as observer

    if strategy == "grouped" and observer._grouped_linear() is None:
        pytest.skip("this transformers has no grouped matmul helper")
    monkeypatch.setattr(observer, "STRATEGY", strategy)
    model = _model()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, 24) for _ in range(5)]
    got, stats = profile_model(model, seqs, batch_size=2, spill_dir=str(tmp_path / "spill"))
    freq, reap, eaft, p_lo, h_lo = _brute_force(model, seqs)
    assert stats.tokens == 5 * 24
    assert stats.p_lo == pytest.approx(p_lo, rel=1e-4)
    assert stats.h_lo == pytest.approx(h_lo, rel=1e-4)
    for li in range(2):
        assert np.array_equal(np.array(got[li]["freq"]), freq[li])
        np.testing.assert_allclose(got[li]["reap"], reap[li], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got[li]["eaft_reap"], eaft[li], rtol=1e-4, atol=1e-6)
        # The largest output norm each expert produced (unrouted experts: 0).
        np.testing.assert_allclose(got[li]["max_act"], _brute_force.max_norm[li], rtol=1e-4, atol=1e-7)
    assert freq.sum() == 2 * 2 * 5 * 24  # every token, k experts, every layer
    assert (eaft < 0).any() or (eaft > 0).any()


def test_observer_leaves_model_outputs_unchanged():
    from profiling.observer import ExpertObserver

    model = _model()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        plain = model(ids).logits
        with ExpertObserver(model):
            observed = model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(observed, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, plain)


def test_eaft_weights_direct():
    p = np.array([0.9, 0.01, 0.5, 0.02, 0.3])
    h = np.array([0.1, 0.1, 0.9, 0.9, 0.2])
    assert eaft_weights(p, h, p_lo=0.1, h_lo=0.2).tolist() == [1.0, -2.0, 0.25, 0.25, 1.0]


@pytest.mark.parametrize("n,cap", [(1, 10), (1000, 50), (5000, 100000), (20000, 300)])
def test_exact_percentile_matches_numpy(n, cap):
    rng = np.random.default_rng(n)
    x = rng.random(n)
    x[: n // 3] = 0.25  # heavy ties
    chunks = lambda: (x[i : i + 777] for i in range(0, n, 777))  # noqa: E731
    for q in (0, 15, 50, 85, 100):
        assert exact_percentile(chunks, q, max_in_memory=cap) == pytest.approx(np.percentile(x, q), abs=1e-12)


def test_packing_and_data_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"input_ids": [1, 2, 3, 4]}) + "\n")
    np.save(tmp_path / "b.npy", np.arange(10, 17))
    (tmp_path / "c.txt").write_text("xy")
    docs = list(documents([tmp_path / "a.jsonl", tmp_path / "b.npy", tmp_path / "c.txt"], ByteTokenizer()))
    assert docs == [[97, 98, 99], [1, 2, 3, 4], list(range(10, 17)), [120, 121]]
    blocks = list(pack(iter(docs), 4, eos=0))
    flat = [97, 98, 99, 0, 1, 2, 3, 4, 0, 10, 11, 12, 13, 14, 15, 16, 0, 120, 121, 0]
    assert [b.tolist() for b in blocks] == [flat[i : i + 4] for i in range(0, 20, 4)]
    assert len(list(pack(iter(docs), 4, max_tokens=8, eos=0))) == 2


def test_profile_cli_drives_prune_and_the_pruned_model_loads(tmp_path):
    import random

    from rewriter.tools.synth import PRESETS, write_checkpoint

    tiny = tmp_path / "tiny"
    write_checkpoint(tiny, PRESETS["tiny"])  # no tokenizer: byte-level

    random.seed(0)
    words = "the of and to in is that for it as with was on be by".split()
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(random.choice(words) for _ in range(30))}) + "\n"
                            for _ in range(20)))
    cli("profile", tiny, "--data", data, "--out", tmp_path / "s.json", "--seq-len", "32", "--batch-size", "4",
        "--domain", "words", "--device", "cpu", "--quiet")
    sal = json.loads((tmp_path / "s.json").read_text())
    assert sal["domain"] == "words" and sal["tokens"] > 0 and set(sal["layers"]) == {"0", "1"}
    from core.checkpoint import Checkpoint
    from planners.saliency import model_identity

    assert {k: sal["model"][k] for k in model_identity(Checkpoint.open(str(tiny)))} == \
        model_identity(Checkpoint.open(str(tiny)))
    before = (tmp_path / "s.json").read_bytes()
    again = cli("profile", tiny, "--data", data, "--out", tmp_path / "s.json", "--device", "cpu", "--quiet", expect=2)
    assert "--force" in again and (tmp_path / "s.json").read_bytes() == before
    cli("prune", tiny, tmp_path / "dst", "--saliency", tmp_path / "s.json", "--keep-frac", "0.5",
        "--rank", "eaft_reap", "--quiet")
    from transformers import GptOssForCausalLM, Mxfp4Config

    m = GptOssForCausalLM.from_pretrained(str(tmp_path / "dst"), quantization_config=Mxfp4Config(dequantize=True))
    assert m.config.num_local_experts == 4
    assert torch.isfinite(m(torch.randint(0, 256, (1, 8))).logits).all()


def test_reap_import(tmp_path):
    state = {0: {"expert_frequency": torch.tensor([3, 0, 5, 1]), "reap": torch.tensor([0.5, 0.0, 0.2, 0.9]),
                 "ean_sum": torch.ones(4)},
             1: {"expert_frequency": torch.tensor([1, 2, 3, 4]), "weighted_ean_sum": torch.tensor([1.0, 1.0, 3.0, 2.0]),
                 "total_tokens": torch.tensor(4096)}}
    torch.save(state, tmp_path / "obs.pt")
    out = cli("import-reap", tmp_path / "obs.pt", "--out", tmp_path / "s.json")
    assert "2 layers" in out
    from planners.saliency import load_saliency

    s = load_saliency(str(tmp_path / "s.json"), 4, [0, 1])
    assert s.tokens == 4096  # REAP's total_tokens, not 0
    assert "total_tokens" not in s.method["other_keys"]
    state[1]["total_tokens"] = torch.tensor(-1.0)
    torch.save(state, tmp_path / "neg.pt")
    assert "total_tokens is -1.0" in cli("import-reap", tmp_path / "neg.pt", "--out", tmp_path / "n.json", expect=2)
    assert s.layers[0]["freq"] == (3.0, 0.0, 5.0, 1.0)
    assert s.layers[1]["reap"] == (1.0, 0.5, 1.0, 0.5)
    torch.save({0: {"reap": torch.ones(2)}}, tmp_path / "bad.pt")
    assert "expert_frequency" in cli("import-reap", tmp_path / "bad.pt", "--out", tmp_path / "x.json", expect=2)
