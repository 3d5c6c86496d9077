"""The benchmarks of the largest presets run end to end at test size, so they cannot rot: the
planner's steps at full sparse geometry (``bench_io.scale``) and the streamed profile and eval
at their layer geometry (``bench_io.streamed_large``, scaled down on the CPU)."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow


def test_scale_times_every_step_and_sizes_the_plan(tmp_path):
    from bench_io.scale import main

    out = tmp_path / "scale.json"
    assert main(["--preset", "deepseek-v3-mini", "--repeat", "1", "--layer", "2", "--out", str(out)]) == 0
    p = json.loads(out.read_text())["presets"]["deepseek-v3-mini"]
    assert p["tensors"] == 3_189 and p["disk"]["on_disk_bytes"] < p["disk"]["apparent_bytes"] * 2
    assert set(p["steps"]) == {"inspect", "synth-saliency", "plan", "dry-run"}
    assert all(s["exit"] == [0] and s["peak_rss_mib"] > 10 for s in p["steps"].values())
    plan = p["plan"]
    assert plan["copy_ranges"] > 0 and plan["plan_bytes_per_copy_range"] == plan["plan_bytes"] // plan["copy_ranges"]
    nodes = {r["nodes"]: r["est_seconds"] for r in p["ray_nodes_extrapolated"] if r["node_bytes_per_s"] == 1e9}
    assert nodes[32] <= nodes[1]
    assert "| deepseek-v3-mini | 3,189 |" in out.with_suffix(".md").read_text()


@pytest.mark.torch
def test_streamed_large_profiles_and_evaluates_fp8_layers_within_two_layers_of_memory(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from bench_io.streamed_large import main

    out = tmp_path / "r.json"
    main(["--preset", "deepseek-v3", "--layers", "4", "--tokens", "512", "--seq-len", "128", "--eval-blocks", "1",
          "--work", str(tmp_path / "w"), "--out", str(out), "--device", "cpu", "--scale-down"])
    r = json.loads(out.read_text())["presets"]["deepseek-v3"]
    assert r["scaled_down"] and r["fp8"] and r["dense_layers"] == 3, r.get("error")
    assert r["saliency_layers"] == [3] and r["profile"]["tokens"] == 512
    x = r["extrapolation"]
    # The FP8 layer read (raw) is half its bf16 weights; the engine holds at most two layers.
    assert x["raw_gib_per_moe_layer"] < x["weights_gib_per_moe_layer"] <= x["peak_weight_gib"] <= 2 * x["weights_gib_per_moe_layer"]
    assert x["whole_model_layers"] == 61 and x["extrapolated_tokens_per_s"] > 0
    assert r["eval"]["exit"] == 0 and r["eval"]["pass"]
    assert not (tmp_path / "w" / "deepseek-v3-4").exists()


@pytest.mark.torch
def test_streamed_attention_stage_runs_both_choices(tmp_path, monkeypatch):
    """``bench_io.streamed --stage attention`` at test size on the CPU, where both choices are
    transformers' default: both runs, their breakdowns, and identical saliency; the variable it
    sets for each run is as it was afterwards."""
    pytest.importorskip("transformers")
    from bench_io.streamed import main
    from profiling.streamed import ATTENTION_ENV

    monkeypatch.setenv(ATTENTION_ENV, "auto")
    out = tmp_path / "a.json"
    main(["--stage", "attention", "--preset", "small", "--layers", "2", "--tokens", "1024", "--seq-len", "64",
          "--device", "cpu", "--breakdown-tokens", "256", "--work", str(tmp_path / "w"), "--out", str(out)])
    r = json.loads(out.read_text())
    for name in ("auto", "default"):
        assert r[name]["tokens"] == 1024 and r[name]["engine"]["extrapolated_tokens_per_s"] > 0, r[name].get("error")
        assert r[name]["breakdown"]["seconds"]["attention"] > 0 and r[name][ATTENTION_ENV] == name
    assert r["device"]
    assert r["auto_vs_default"] == {"layers": 2, "layers_with_identical_freq": 2, "max_rel_diff_reap": 0.0,
                                    "max_rel_diff_eaft_reap": 0.0}
    assert os.environ[ATTENTION_ENV] == "auto"
