"""The Ray benchmark runs end to end at a tiny size, so it cannot rot."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_bench_harness_tiny(tmp_path):
    pytest.importorskip("ray")
    from bench_io.raybench import run

    lines: list[str] = []
    doc = run("tiny", tmp_path / "work", tmp_path / "results", rounds=1, workers=(1, 2), log=lines.append)
    saved = json.loads((tmp_path / "results" / "ray-latest.json").read_text())
    assert set(saved["best"]) == {"local", "local-1", "ray-1", "ray-2"}, [r.get("error") for r in saved["runs"]]
    for name, r in saved["best"].items():
        d = r["driver"]
        parts = [d[k] for k in ("wait_s", "journal_s", "finalize_s", "prepare_s", "copy_s", "setup_s", "other_s")]
        parts.append(max(d["hash_s"], d["commit_s"]))
        assert min(parts) >= 0 and sum(parts) == pytest.approx(r["run_s"], rel=0.05, abs=0.05), name
        assert r["bytes_written"] == saved["plan"]["bytes_written"]
    assert saved["best"]["ray-1"]["driver"]["wait_s"] > 0  # the driver waited for its actor
    assert saved["best"]["local"]["driver"]["copy_s"] > 0
    assert saved["best"]["local-1"]["driver"]["copy_s"] > 0
    assert [c["workers"] for c in doc["scaling"]["check"]] == [1, 2]
    assert doc["scaling"]["full_120b"][0]["bytes_written"] > 30e9
    table = (tmp_path / "results" / "ray-latest.md").read_text()
    assert "| ray-2 |" in table and "cores" in table
