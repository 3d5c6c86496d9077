"""The evaluation harness, its gates, and the quality benchmark at toy size."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from quality.gates import Gates, check, histogram, jsd  # noqa: E402
from tests.conftest import cli  # noqa: E402

pytestmark = pytest.mark.torch


def _row(ppl, p, cc, hist):
    return {"ppl": ppl, "mean_p": p, "cc_rate": cc, "hist": hist}


def test_gates_rule():
    rng = np.random.default_rng(0)
    h = histogram(rng.random(5000), rng.random(5000))
    base = _row(10.0, 0.5, 0.01, h)
    assert check(base, _row(10.4, 0.49, 0.011, h), Gates())["pass"]  # 0.4 <= 5% of 10 = 0.5
    r = check(base, _row(10.6, 0.49, 0.011, h), Gates())
    assert not r["pass"] and not r["pass_ppl"] and r["ppl_limit"] == 0.5
    assert check(_row(2.0, 0.5, 0.01, h), _row(2.24, 0.5, 0.01, h), Gates())["pass"]  # absolute floor 0.25
    assert not check(base, _row(10.0, 0.47, 0.01, h), Gates())["pass_mean_p"]
    assert not check(base, _row(10.0, 0.5, 0.013, h), Gates())["pass_cc"]
    other = histogram(rng.random(5000) ** 3, rng.random(5000))
    assert not check(base, _row(10.0, 0.5, 0.01, other), Gates())["pass_jsd"]
    assert check(base, _row(10.6, 0.5, 0.01, h), Gates(ppl_rel=0.1))["pass"]


def test_jsd_properties():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert jsd(a, a) == 0.0
    assert jsd(a, b) == pytest.approx(1.0)
    assert jsd(a, 3 * a) == 0.0
    assert 0 < jsd(a, a + 0.1) < 1


def _packs(tmp_path):
    import random

    random.seed(3)
    words = "the of and to in is that for it as with was on be by".split()
    (tmp_path / "words.jsonl").write_text("".join(
        json.dumps({"text": " ".join(random.choice(words) for _ in range(50))}) + "\n" for _ in range(20)))
    (tmp_path / "sums.jsonl").write_text("".join(
        json.dumps({"text": f"{a}+{b}={a + b}\n" * 3}) + "\n" for a, b in zip(range(0, 300, 7), range(5, 400, 9))))
    return [tmp_path / "words.jsonl", tmp_path / "sums.jsonl"]


def test_eval_cli_self_comparison_passes_and_pruned_fails(tmp_path):
    from rewriter.tools.synth import PRESETS, write_checkpoint

    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["tiny"])
    packs = _packs(tmp_path)
    args = [a for p in packs for a in ("--data", p)]
    out = json.loads(cli("eval", src, *args, "--seq-len", "32", "--seq-len", "64", "--blocks", "3",
                         "--device", "cpu", "--json"))
    assert [(r["pack"], r["seq_len"]) for r in out["rows"]] == [
        ("words", 32), ("sums", 32), ("union", 32), ("words", 64), ("sums", 64), ("union", 64)]
    assert out["pass"] is None
    assert all(r["ppl"] > 1 and 0 < r["mean_p"] < 1 and 0 <= r["mean_entropy"] <= 1 for r in out["rows"])
    union = out["rows"][2]
    assert union["tokens"] == out["rows"][0]["tokens"] + out["rows"][1]["tokens"]
    text = cli("eval", src, *args, "--seq-len", "32", "--blocks", "3", "--device", "cpu", "--compare", src,
               "--plot", tmp_path / "h.png")
    assert "near-lossless: PASS" in text
    assert (tmp_path / "h.png").stat().st_size > 1000
    (tmp_path / "keep.json").write_text(json.dumps({"0": [0, 1], "1": [2, 3]}))
    cli("prune", src, tmp_path / "pruned", "--keep-list", tmp_path / "keep.json", "--quiet")
    out = cli("eval", tmp_path / "pruned", *args, "--seq-len", "32", "--blocks", "3", "--device", "cpu",
              "--compare", src, "--json", expect=None)
    result = json.loads(out)
    assert any(r["check"]["d_ppl"] != 0 for r in result["rows"])  # pruning changed the model
    assert result["pass"] == all(r["check"]["pass"] for r in result["rows"])
    # A gate no model can meet: every row fails it, and the exit status says so.
    out = cli("eval", tmp_path / "pruned", *args, "--seq-len", "32", "--blocks", "3", "--device", "cpu",
              "--compare", src, "--gate-cc", "-1", "--json", expect=1)
    result = json.loads(out)
    assert result["pass"] is False and all(not r["check"]["pass_cc"] for r in result["rows"])


@pytest.mark.slow
def test_quality_benchmark_toy(tmp_path, monkeypatch):
    """The toy benchmark in two commands: --train-only trains each seed's model, --reuse-trained
    evaluates those models (the grid, the report)."""
    from profiling.streamed import ATTENTION_ENV
    from quality.benchmark import parse_args, run

    monkeypatch.delenv(ATTENTION_ENV, raising=False)

    common = ["--size", "toy", "--device", "cpu", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    logged: list[str] = []
    trained = run(parse_args([*common, "--train-only", "--trace-training", "--train-seconds", "600"]),
                  log=logged.append)
    assert not (tmp_path / "results" / "quality-toy.json").exists()  # training only: no report
    # --train-seconds gives the toy a time budget, capped by its 4 steps.
    assert [(sd["training"]["steps"], sd["training"]["budget_seconds"]) for sd in trained["seeds"]] == [(4, 600), (4, 600)]
    assert sum("run again with --reuse-trained" in line for line in logged) == 2
    # The toy trains 4 steps, fewer than the trace skips: each seed's trace file says so.
    assert "no step traced: training ended after 4 steps" in (tmp_path / "results" / "train-trace-toy-seed0.txt").read_text()
    doc = run(parse_args([*common, "--reuse-trained"]), log=logged.append)
    assert sum("reusing the model trained in" in line for line in logged) == 2
    assert [{**sd["training"], "reused": True} for sd in trained["seeds"]] == [sd["training"] for sd in doc["seeds"]]
    md = (tmp_path / "results" / "quality-toy.md").read_text()
    assert "their models trained by an earlier run (--train-only)" in md and "a budget of 600 s" in md
    assert "(evaluation only: training was the earlier run's)" in md
    assert [sd["seed"] for sd in doc["seeds"]] == [0, 1]
    assert ATTENTION_ENV not in os.environ  # evaluation's attention choice does not outlive it
    for sd in doc["seeds"]:
        assert sd["calib_seeds_done"] == [0, 1]
        ranks = {(r["rank"], r["calibration"]) for r in sd["runs"]}
        assert ranks == {("freq", "union"), ("reap", "union"), ("eaft_reap", "union"),
                         ("eaft_reap+outliers", "union"), ("random", "-"), ("freq+recal", "union"),
                         ("reap+recal", "union"), ("eaft_reap+recal", "union"), ("random+recal", "-")}
        for r in sd["runs"]:  # a recalibrated run has the plain run's keep sets and its fit per layer
            if r["rank"].endswith("+recal"):
                plain = next(p for p in sd["runs"] if p["rank"] == r["rank"].removesuffix("+recal")
                             and p["calib_seed"] == r["calib_seed"] and p["keep"] == r["keep"])
                assert r["keep_sets"] == plain["keep_sets"] and set(r["recal"]) == {"0", "1"}
                assert all(f["mse_after"] <= f["mse_before"] for f in r["recal"].values())
        assert len(sd["runs"]) == 2 * len(ranks)  # every cell once per calibration draw
        for r in sd["runs"]:
            assert set(r["packs"]) == {"code", "prose", "arith", "union"}
            assert all(np.isfinite(v["ppl"]) and v["base_ppl"] > 1 for v in r["packs"].values())
            assert set(r["tasks"]) == set(r["task_bytes"]) == {"arith", "code"}
            assert all(0 <= v <= 1 for v in [*r["tasks"].values(), *r["task_bytes"].values()])
            assert set(r["task_kinds"]["arith"]) <= {"+", "-", "*"} and set(r["task_kinds"]["code"]) == {"line"}
        assert {r["domain"] for r in sd["stability"]} == {"code", "prose", "arith"}
        assert all(0 <= r["mean_jaccard"] <= 1 for r in sd["stability"])
    assert all(v["sha256"] and v["bytes"] > 0 for v in doc["corpora"].values())
    md = (tmp_path / "results" / "quality-toy.md").read_text()
    assert "| eaft_reap | 4 (50.0%) | union |" in md and " ± " in md
    assert "## Which differences are outside the noise" in md and "## Keep-set stability" in md
    assert "| arith byte |" in md and "| arith | all | 24 |" in md
    assert "## Router recalibration against the plain prune" in md and "| eaft_reap+recal | eaft_reap | 4 | union |" in md
    result = json.loads((tmp_path / "results" / "quality-toy.json").read_text())
    pairs = {(c["a"][0], c["b"][0], c["metric"]) for c in result["comparisons"]}
    assert {(f"{r}+recal", r, m) for r in ("freq", "reap", "eaft_reap", "random")
            for m in ("ppl_union", "acc_arith", "byte_arith", "acc_code", "byte_code")} <= pairs
    assert {(r["rank"], r["keep"]) for r in result["recalibration"]} == {
        ("freq", 4), ("reap", 4), ("eaft_reap", 4), ("random", 4)}
    saved = json.loads((tmp_path / "results" / "quality-toy.json").read_text())
    assert {c["rank"] for c in saved["cells"]} >= {"eaft_reap", "random"} and saved["comparisons"]
    assert (tmp_path / "results" / "quality-toy.png").stat().st_size > 1000
    work = tmp_path / "work"
    for d in ("code", "prose", "arith"):
        calib = set((work / "corpora" / f"{d}-calib.jsonl").read_text().splitlines())
        ev = set((work / "corpora" / f"{d}-eval.jsonl").read_text().splitlines())
        assert calib and ev and not calib & ev  # calibration and evaluation never share a document
        a = set((work / "seed-0" / "calib-0" / f"{d}-A.jsonl").read_text().splitlines())
        b = set((work / "seed-0" / "calib-0" / f"{d}-B.jsonl").read_text().splitlines())
        assert a and b and not a & b and a | b == calib  # the two halves split the calibration documents


def test_training_with_a_budget_and_a_trace(tmp_path):
    """The reference MoE trains for a time budget (steps done are recorded, the schedule ends
    at the budget) and ``trace`` writes where a step's time goes."""
    from quality.refmoe import TRACE_FROM, TRACE_STEPS, ModelSize, build_corpora, train

    corpora = tmp_path / "corpora"
    build_corpora(corpora, 60_000)
    size = ModelSize(layers=1, experts=4, top_k=2, hidden=32, intermediate=32, heads=2, kv_heads=1, head_dim=16)
    trace = tmp_path / "trace.txt"
    info = train(corpora, tmp_path / "m", size=size, steps=TRACE_FROM + TRACE_STEPS, seq_len=32, batch_size=2,
                 device="cpu", trace=trace, log=lambda *a: None)
    assert info["steps"] == TRACE_FROM + TRACE_STEPS and info["budget_seconds"] is None
    text = trace.read_text()
    assert text.startswith(f"{TRACE_STEPS} training steps traced") and "aten::" in text
    info = train(corpora, tmp_path / "b", size=size, steps=10**6, seq_len=32, batch_size=2, device="cpu",
                 budget=0.5, log=lambda *a: None)
    assert 1 <= info["steps"] < 10**6 and info["max_steps"] == 10**6 and info["budget_seconds"] == 0.5
    assert info["tokens"] == info["steps"] * 2 * 32
    assert (tmp_path / "b" / "config.json").exists()
    assert "_experts_implementation" not in (tmp_path / "b" / "config.json").read_text()


def test_grouped_experts_match_the_eager_experts_and_their_gradients():
    """The training experts (grouped bfloat16 matmuls, biases by one-hot matmul) compute what
    transformers' eager experts compute, and give every parameter the same gradient, to
    bfloat16's precision."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from quality.refmoe import grouped_experts_forward

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, layer_types=["full_attention"])
    experts = GptOssForCausalLM(cfg).model.layers[0].mlp.experts
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(40, 32)
    index = torch.randint(0, 4, (40, 2))
    index[:, 1] = (index[:, 0] + 1) % 4  # two different experts per token, as top-k routing gives
    weight = torch.rand(40, 2)
    grads = []
    for fn in (type(experts).forward, grouped_experts_forward):
        experts.zero_grad()
        out = fn(experts, x, index, weight)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in experts.named_parameters()}))
    (ref, ref_grads), (got, got_grads) = grads
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 0.02 * scale
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name
        assert (got_grads[name] - g).abs().max() <= 0.03 * g.abs().max(), name


def test_reusing_models_that_were_never_trained_is_a_clear_error(tmp_path, capsys):
    from quality.benchmark import parse_args, run

    common = ["--size", "toy", "--device", "cpu", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as e:
        run(parse_args([*common, "--reuse-trained"]), log=lambda *a: None)
    assert str(e.value) == (f"{tmp_path / 'work' / 'seed-0' / 'reference-moe'}: no reference model trained there; "
                            f"train it first with --train-only and the same --work")
    assert not (tmp_path / "work" / "corpora").exists()  # refused before any work
    for extra, said in ((["--train-only"], "give one of them"), (["--train-seconds", "5"], "which --reuse-trained skips")):
        with pytest.raises(SystemExit) as e:
            parse_args([*common, "--reuse-trained", *extra])
        assert e.value.code == 2 and said in capsys.readouterr().err
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            parse_args([*common, "--train-seconds", bad])
        assert e.value.code == 2 and "a number of seconds > 0" in capsys.readouterr().err
