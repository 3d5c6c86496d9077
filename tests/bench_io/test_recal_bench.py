"""The recalibration timing benchmark runs end to end at a tiny geometry on the CPU, so it cannot rot."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.torch]


def test_recal_bench_tiny_on_cpu(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from bench_io.recal import main

    out = tmp_path / "recal.json"
    assert main(["--work", str(tmp_path / "w"), "--out", str(out), "--preset", "tiny", "--layers", "2",
                 "--device", "cpu", "--tokens", "2048", "--fit-tokens", "512", "--steps", "3", "--seq-len", "128",
                 "--gpu-memory", "0"]) == 0
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    assert "error" not in run, run
    assert run["tokens"] == 2048 and [t["layer"] for t in run["layers"]] == [0, 1]
    assert all(t["fit_s"] > 0 and t["forward_s"] >= 0 for t in run["layers"])
    assert [f["layer"] for f in run["fits"]] == [0, 1]
    assert all(f["mse_after"] <= f["mse_before"] for f in run["fits"])
    assert run["method"]["kind"] == "router-recalibration" and run["method"]["steps"] == 3
    assert run["extrapolated_36_layers_1m_tokens_s"] > 0
