"""The benchmark harness runs end to end at a tiny size, so it cannot rot."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_bench_harness_tiny(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("moto")
    from bench_io.bench import run

    lines: list[str] = []
    doc = run("tiny", tmp_path / "work", tmp_path / "results",
              contenders=("naive", "lazy", "ours", "ours-buffered", "floor", "dd"), log=lines.append)
    saved = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert saved["ratios"] == doc["ratios"]
    table = (tmp_path / "results" / "latest.md").read_text()
    assert "| full | ours |" in table and "| layer | naive |" in table
    assert (tmp_path / "results" / "latest.png").stat().st_size > 1000
    ms = {(m["workload"], m["contender"]): m for m in saved["measurements"]}
    assert all(m["ok"] for m in ms.values()), [m["note"] for m in ms.values() if not m["ok"]]
    # Every contender wrote the same number of tensor bytes (headers differ slightly).
    full = [m["output_bytes"] for (w, c), m in ms.items() if w == "full" and c not in ("floor", "dd")]
    assert ms[("full", "dd")]["output_bytes"] == ms[("full", "floor")]["output_bytes"]
    assert max(full) - min(full) < 4096
    assert 0 < saved["s3"]["tensor_bytes_fetched"] < saved["s3"]["bytes_written"] < saved["s3"]["source_bytes"]
    assert saved["s3"]["fetched_over_written"] <= 1.01
    assert saved["planning_120b"]["output_shards"] >= 7
