"""Router recalibration: the fit on tiny real transformers MoE layers of each supported family,
and ``rewriter recalibrate`` end to end (recalibrate -> run -> verify -> eval) on a tiny gpt-oss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from profiling.recal_fit import FitSettings, PrunedLayer, fit_layer  # noqa: E402
from profiling.recalibrate import moe_modules  # noqa: E402
from tests.conftest import cli  # noqa: E402
from tests.e2e.test_families import COMMON, FAMILIES  # noqa: E402

pytestmark = pytest.mark.torch

KEEP = [0, 2, 5, 6]  # half of 8 experts
#: Each dropped expert is a near copy of a kept one, as experts of trained models often overlap:
#: the plain prune sends their tokens to whatever ranks next, a refitted router to the copy.
PARTNER = {1: 0, 3: 2, 4: 5, 7: 6}


def _gpt_oss():
    cfg = transformers.GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                                    num_experts_per_tok=2)
    return transformers.GptOssForCausalLM(cfg)


def _family(name: str):
    if name == "gpt_oss":
        model = _gpt_oss()
    else:
        cfg_cls, model_cls, kw, _ = FAMILIES[name]
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**{**COMMON, **kw, "num_hidden_layers": 1}))
    model = model.float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n:
                p.normal_(0, 0.1)
                if p.dim() >= 2 and p.shape[0] == 8:  # fused [E, ...] expert tensors
                    for dropped, kept in PARTNER.items():
                        p[dropped] = p[kept] + 0.01 * torch.randn_like(p[kept])
        for n, p in model.named_parameters():  # per-expert modules (experts.N.*), where a family has them
            parts = n.split(".")
            if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
                e = int(parts[parts.index("experts") + 1])
                if e in PARTNER:
                    p.copy_(model.get_parameter(n.replace(f"experts.{e}.", f"experts.{PARTNER[e]}.")))
        for router, _ in moe_modules(model).values():
            router.weight.normal_(0, 0.3)
            if isinstance(getattr(router, "bias", None), torch.Tensor):
                router.bias.normal_(0, 0.1)
    return model


def _layer_data(model, tokens: int = 4096, seed: int = 0):
    """Inputs of layer 0's experts module and its original output, through the module itself."""
    router, experts = moe_modules(model)[0]
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, scores, idx = router(x)
        y = experts(x, idx, scores)
    return router, experts, x, y


SETTINGS = FitSettings(steps=60, lr=0.4, batch_tokens=512)


@pytest.mark.parametrize("name", ["gpt_oss", "qwen3_moe", "qwen3_moe_unnormalized", "qwen2_moe", "mixtral", "olmoe"])
def test_pruned_routing_is_the_familys_own_and_the_fit_lowers_held_out_error(name):
    torch.manual_seed(0)
    router, experts, x, y = _layer_data(_family(name))
    k = router.top_k
    every = PrunedLayer(router, experts, torch.arange(experts.num_experts), k)
    # With every expert kept, the pruned layer computes exactly what the family's layer computes.
    torch.testing.assert_close(every.output(every.params(torch.float32), x), y, rtol=1e-4, atol=1e-5)
    pruned = PrunedLayer(router, experts, torch.tensor(KEEP), k)
    fit = fit_layer(0, pruned, x, y, SETTINGS, torch.float32)
    assert fit.accepted and fit.mse_after < 0.97 * fit.mse_before, (fit.mse_before, fit.mse_after)
    assert fit.held_out_tokens == 512 and fit.train_tokens == 3584
    assert fit.weight is not None and tuple(fit.weight.shape) == (len(KEEP), x.shape[1])
    assert (fit.bias is not None) == (name == "gpt_oss")  # only gpt-oss routers have a bias
    assert experts.num_experts == 8 and router.top_k == k  # the modules are left as they were


def test_zero_steps_is_the_plain_prune_and_the_fit_is_deterministic():
    torch.manual_seed(1)
    router, experts, x, y = _layer_data(_family("gpt_oss"))
    layer = PrunedLayer(router, experts, torch.tensor(KEEP), 2)
    zero = fit_layer(0, layer, x, y, FitSettings(steps=0), torch.bfloat16)
    assert not zero.accepted and zero.weight is None and zero.bias is None
    assert zero.mse_after == zero.mse_before > 0
    # The plain prune's parameters are the kept rows, unchanged.
    assert torch.equal(layer.params(torch.float32)["weight"], router.weight.detach()[KEEP])
    a, b = (fit_layer(0, layer, x, y, SETTINGS, torch.bfloat16) for _ in range(2))
    assert a.weight is not None and b.weight is not None and a.weight.dtype == torch.bfloat16
    assert torch.equal(a.weight, b.weight) and a.mse_after == b.mse_after
    c = fit_layer(0, layer, x, y, FitSettings(steps=60, lr=0.4, batch_tokens=512, seed=7), torch.bfloat16)
    assert c.weight is not None and not torch.equal(a.weight, c.weight)  # the seed matters


def test_a_fit_that_does_not_help_keeps_the_plain_rows():
    """A fit judged on held-out tokens it cannot improve (an absurd step size) is not kept."""
    torch.manual_seed(2)
    router, experts, x, y = _layer_data(_family("gpt_oss"))
    fit = fit_layer(0, PrunedLayer(router, experts, torch.tensor(KEEP), 2), x, y,
                    FitSettings(steps=5, lr=1e4, batch_tokens=256), torch.float32)
    assert not fit.accepted and fit.weight is None and fit.mse_after == fit.mse_before


# --- the command ------------------------------------------------------------------------------


def _source_with_partners(path: Path) -> Path:
    """A tiny bf16 gpt-oss (2 layers x 8 experts) whose dropped experts are near copies of kept ones."""
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                                    num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                                    sliding_window=8)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p.normal_(0, 0.3)  # MoE outputs that matter next to the residual stream
                for dropped, kept in PARTNER.items():
                    p[dropped] = p[kept] + 0.01 * torch.randn_like(p[kept])
            layer.mlp.router.weight.normal_(0, 0.3)
            layer.mlp.router.bias.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 0.5)
    model.to(torch.bfloat16).save_pretrained(str(path))
    return path


def _ids(path: Path, docs: int, length: int, seed: int, vocab: int = 256) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("".join(json.dumps({"input_ids": rng.integers(0, vocab, length).tolist()}) + "\n"
                            for _ in range(docs)))
    return path


FIT = ["--seq-len", "64", "--device", "cpu", "--steps", "60", "--lr", "0.4", "--batch-tokens", "512"]


@pytest.fixture(scope="module")
def recalibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("recal")
    src = _source_with_partners(root / "src")
    (root / "keep.json").write_text(json.dumps({"0": KEEP, "1": KEEP}))
    cli("plan", src, "--keep-list", root / "keep.json", "--out", root / "plan.json")
    cal = _ids(root / "cal.jsonl", 80, 64, seed=0)
    out = cli("recalibrate", src, "--plan", root / "plan.json", "--data", cal, "--out", root / "recal.json", *FIT)
    return root, src, cal, out


@pytest.mark.slow
def test_recalibrate_run_verify_and_only_routers_differ(recalibrated):
    from safetensors.torch import load_file

    root, src, cal, out = recalibrated
    assert "wrote" in out and "2 of 2 MoE layers with new router rows" in out, out
    doc = json.loads((root / "recal.json").read_text())
    assert doc["version"] == 3 and doc["carried"]["method"]["kind"] == "router-recalibration"
    assert doc["carried"]["method"]["calibration_data"][0]["name"] == "cal.jsonl"
    assert sorted(doc["carried"]["tensors"]) == sorted(f"model.layers.{i}.mlp.router.{w}" for i in (0, 1)
                                                       for w in ("weight", "bias"))
    for plan, dst in (("plan.json", "plain"), ("recal.json", "recal")):
        cli("run", root / plan, "--out", root / dst, "--quiet")
        assert "OK" in cli("verify", src, root / dst)

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    plain, recal = tensors(root / "plain"), tensors(root / "recal")
    assert plain.keys() == recal.keys()
    differ = sorted(k for k in plain if not torch.equal(plain[k], recal[k]))
    assert differ == sorted(doc["carried"]["tensors"])
    assert (root / "plain" / "config.json").read_bytes() == (root / "recal" / "config.json").read_bytes()
    # pruning.json and the model card say which tensors are new and how they were made.
    for name in ("pruning.json", "README.md"):
        text = (root / "recal" / name).read_text()
        assert "router-recalibration" in text and "model.layers.1.mlp.router.weight" in text, name
        assert "router-recalibration" not in (root / "plain" / name).read_text()
    # Recalibrated on calibration text, the pruned model is closer to the original on text like it
    # (another draw of the same kind of ids) than the plain prune: in the logits, and in `rewriter
    # eval --compare`'s perplexity. (On a random tiny model the perplexity itself is no judge:
    # closer to the original is the claim that holds.)
    ev = _ids(root / "ev.jsonl", 40, 64, seed=1)
    kl = {d: _kl_to_original(src, root / d, ev) for d in ("plain", "recal")}
    assert kl["recal"] < 0.9 * kl["plain"], kl
    args = ["--data", ev, "--seq-len", "64", "--blocks", "8", "--device", "cpu", "--json", "--compare", src]
    d_plain, d_recal = (json.loads(cli("eval", root / d, *args, expect=None))["rows"][0]["check"]
                        for d in ("plain", "recal"))
    assert abs(d_recal["d_ppl"]) < abs(d_plain["d_ppl"]), (d_plain, d_recal)


def _kl_to_original(src: Path, pruned: Path, data: Path) -> float:
    """Mean KL(original || pruned) of the next-token distributions over ``data``'s tokens."""
    from profiling.profile import load_model

    ids = torch.tensor([json.loads(line)["input_ids"] for line in data.read_text().splitlines()])
    with torch.no_grad():
        p, q = (load_model(str(m), "cpu", torch.float32)(ids).logits.log_softmax(-1) for m in (src, pruned))
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.slow
def test_zero_steps_writes_the_plain_plan_and_a_rerun_the_same_rows(recalibrated, tmp_path):
    root, src, cal, _ = recalibrated
    out = cli("recalibrate", src, "--plan", root / "plan.json", "--data", cal, "--out", tmp_path / "p.json",
              *FIT, "--steps", "0")
    assert "0 of 2 MoE layers with new router rows" in out
    assert "plain prune's rows stay" in out
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads((root / "plan.json").read_text())
    # Same inputs and seed on the CPU: the same new rows, byte for byte.
    cli("recalibrate", src, "--plan", root / "plan.json", "--data", cal, "--out", tmp_path / "again.json", *FIT)
    again, first = (json.loads(p.read_text())["carried"] for p in (tmp_path / "again.json", root / "recal.json"))
    assert again == first


@pytest.mark.slow
def test_a_recalibrated_plan_with_a_sidecar_says_so_and_runs_only_beside_it(tmp_path):
    src = tmp_path / "src"
    cli("synth", "--preset", "small", "--computing", "--quiet", src)  # routers too big to go inline
    cli("synth-saliency", src, "--out", tmp_path / "sal.json")
    cli("plan", src, "--saliency", tmp_path / "sal.json", "--keep-frac", "0.5", "--out", tmp_path / "plan.json")
    (tmp_path / "out").mkdir()
    words = np.random.default_rng(0).choice("the cat sat on a mat while dogs run far into green hills".split(), 6000)
    (tmp_path / "c.txt").write_text(" ".join(words))
    out = cli("recalibrate", src, "--plan", tmp_path / "plan.json", "--data", tmp_path / "c.txt", "--out",
              tmp_path / "out" / "recal.json", "--device", "cpu", "--seq-len", "64", "--max-tokens", "2048",
              "--tokens", "1024", "--steps", "5", "--batch-tokens", "256")
    assert "4 of 4 MoE layers with new router rows" in out, out  # every router carried: over the inline limit
    (side,) = (tmp_path / "out").glob("carried-*.safetensors")
    assert f"{side.name} beside the plan" in out, out
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "out" / "recal.json", tmp_path / "moved" / "recal.json")
    assert side.name in _error("run", tmp_path / "moved" / "recal.json", "--out", tmp_path / "dst", "--quiet")
    shutil.copy(side, tmp_path / "moved" / side.name)
    cli("run", tmp_path / "moved" / "recal.json", "--out", tmp_path / "dst", "--quiet")
    assert "OK" in cli("verify", src, tmp_path / "dst")


def _error(*args: object) -> str:
    out = cli(*args, expect=2)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out, out
    return lines[0]


def test_recalibrate_refuses_an_out_it_would_not_replace_before_reading_anything(tmp_path, tiny, tiny_saliency):
    plan = tmp_path / "plan.json"
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", plan)
    keep = tmp_path / "notes.json"
    keep.write_text('{"mine": true}')
    # The calibration file does not exist either: the --out refusal comes first, before any fit.
    line = _error("recalibrate", tiny, "--plan", plan, "--data", tmp_path / "missing.txt", "--out", keep,
                  "--device", "cpu")
    assert "--out" in line and "notes.json is not a plan file" in line, line
    assert keep.read_text() == '{"mine": true}'
    line = _error("recalibrate", tiny, "--plan", plan, "--data", tmp_path / "missing.txt", "--out",
                  tmp_path / "no" / "p.json", "--device", "cpu")
    assert "--out" in line and "not an existing folder" in line, line


def test_seeds_out_of_range_are_refused_and_the_largest_runs(tmp_path, tiny, tiny_saliency):
    plan = tmp_path / "plan.json"
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", plan)
    fit = ["--plan", plan, "--data", _ids(tmp_path / "c.jsonl", 4, 64, 0), "--device", "cpu", "--seq-len", "64", "--max-tokens", "256",
           "--steps", "1", "--batch-tokens", "64", "--quiet"]
    for seed in (str(2**63), "-1"):
        line = _error("recalibrate", tiny, *fit, "--out", tmp_path / "r.json", "--seed", seed)
        assert "--seed" in line and "0<=x<=4294967295" in line, line
        assert "--seed" in _error("synth-saliency", tiny, "--out", tmp_path / "s.json", "--seed", "-1")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "s.json").exists()
    assert "wrote" in cli("recalibrate", tiny, *fit, "--out", tmp_path / "r.json", "--seed", str(2**32 - 1))


@pytest.mark.slow
def test_recalibrate_refusals_are_one_clear_error(recalibrated, tmp_path, tiny):
    root, src, cal, _ = recalibrated
    common = ["--data", cal, "--out", tmp_path / "o.json", "--device", "cpu"]
    plan = root / "plan.json"
    assert "is not the one the plan was made from" in _error("recalibrate", tiny, "--plan", plan, *common)
    cli("soft-prune", src, tmp_path / "soft", "--keep-list", root / "keep.json", "--plan-out", tmp_path / "soft.json",
        "--quiet")
    assert "soft prune" in _error("recalibrate", src, "--plan", tmp_path / "soft.json", *common)
    assert "already carries" in _error("recalibrate", src, "--plan", root / "recal.json", *common)
    assert "no CUDA device" in _error("recalibrate", src, "--plan", plan, *common[:-2], "--device", "cuda")
    (tmp_path / "empty.jsonl").write_text("")
    msg = _error("recalibrate", src, "--plan", plan, "--data", tmp_path / "empty.jsonl", "--out",
                 tmp_path / "o.json", "--device", "cpu")
    assert "holds no text" in msg
    assert "--out" in _error("recalibrate", src, "--plan", plan, "--data", cal, "--out", plan, "--device", "cpu")
    assert not (tmp_path / "o.json").exists()


@pytest.mark.slow
def test_recalibrate_refuses_a_family_it_cannot_fit(tmp_path):
    from tests.e2e.test_families import _build

    src = tmp_path / "ds"
    _build("deepseek_v3", src)
    (tmp_path / "keep.json").write_text(json.dumps({str(i): [1, 3, 4, 6] for i in (1, 2)}))
    cli("plan", src, "--keep-list", tmp_path / "keep.json", "--out", tmp_path / "plan.json")
    msg = _error("recalibrate", src, "--plan", tmp_path / "plan.json", "--data", _ids(tmp_path / "c.jsonl", 4, 32, 0, 128),
                 "--out", tmp_path / "o.json", "--device", "cpu")
    assert "deepseek_v3" in msg and "gpt-oss" in msg


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_recalibrate_other_families_end_to_end(tmp_path, name):
    """Mixtral's router is stored under another name than the model's module (block_sparse_moe.gate);
    Qwen2-MoE has a shared expert beside the routed ones: the new rows land on the stored names."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    _family(name).save_pretrained(str(tmp_path / "src"))
    src = tmp_path / "src"
    (tmp_path / "keep.json").write_text(json.dumps({"0": KEEP}))
    cli("plan", src, "--keep-list", tmp_path / "keep.json", "--out", tmp_path / "plan.json")
    cal = _ids(tmp_path / "cal.jsonl", 80, 64, seed=0, vocab=COMMON["vocab_size"])
    out = cli("recalibrate", src, "--plan", tmp_path / "plan.json", "--data", cal, "--out", tmp_path / "r.json", *FIT)
    assert "1 of 1 MoE layers with new router rows" in out, out
    carried = json.loads((tmp_path / "r.json").read_text())["carried"]["tensors"]
    router = "block_sparse_moe.gate.weight" if name == "mixtral" else "mlp.gate.weight"
    assert list(carried) == [f"model.layers.0.{router}"]
    cli("run", tmp_path / "r.json", "--out", tmp_path / "dst", "--quiet")
    assert "OK" in cli("verify", src, tmp_path / "dst")
    out_tensors = {k: v for f in (tmp_path / "dst").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert tuple(out_tensors[f"model.layers.0.{router}"].shape) == (len(KEEP), COMMON["hidden_size"])
