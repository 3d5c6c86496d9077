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
    gguf = saved["planning_120b"]["gguf"]
    assert gguf["source_files"] > 1 and gguf["output_shards"] >= 7 and gguf["header_bytes_read"] < 4 << 20
    layer = {c: m["output_bytes"] for (w, c), m in ms.items() if w == "layer-gguf"}
    assert layer.keys() == {"ours", "ours-buffered"} and len(set(layer.values())) == 1
    # The same experts' bytes as the safetensors layer (headers and GGUF padding aside).
    assert abs(layer["ours"] - ms[("layer", "ours")]["output_bytes"]) < 64 << 10


def test_bench_layers_only_writes_the_two_layer_rewrites_side_by_side(tmp_path):
    """``python -m bench_io run --only layers``: the safetensors and GGUF layer rewrites and
    planning, as ``layers.*``; the full run's ``latest.*`` are left alone."""
    from bench_io.__main__ import main

    results = tmp_path / "results"
    assert main(["run", "--size", "tiny", "--only", "layers", "--work", str(tmp_path / "work"), "--results",
                 str(results), "--contenders", "ours,ours-buffered", "--repeat", "1", "--note", "a busy machine"]) == 0
    saved = json.loads((results / "layers.json").read_text())
    ms = {(m["workload"], m["contender"]): m for m in saved["measurements"]}
    assert set(ms) == {(w, c) for w in ("layer", "layer-gguf") for c in ("ours", "ours-buffered")}
    assert all(m["ok"] for m in ms.values())
    assert abs(ms[("layer-gguf", "ours")]["output_bytes"] - ms[("layer", "ours")]["output_bytes"]) < 64 << 10
    table = (results / "layers.md").read_text()
    assert "Conditions: a busy machine" in table and "| layer-gguf | ours |" in table
    assert not (results / "latest.json").exists() and saved["planning_120b"]["gguf"]["source_files"] > 1


def test_remote_bench_tiny(tmp_path):
    """The shaped-store benchmark end to end: every contender writes the same shards, the
    concurrent path fetches the plan's bytes and keeps within its limits."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from bench_io import remote
    from bench_io.bench import SIZES

    doc = remote.run(SIZES["tiny"].remote_geometry, tmp_path / "work", tmp_path / "results", source_name="r",
                     delay_s=0.005, conn_bytes_per_s=50e6, requests=4, inflight_mib=8, log=lambda *_: None)
    rows = {r["contender"]: r for r in doc["rows"]}
    assert all(r["ok"] for r in rows.values()), [r["note"] for r in rows.values() if not r["ok"]]
    assert doc["identical_outputs"]
    # (Opening the checkpoint reads up to 8 shard headers at once; the data keeps to 4 requests.)
    assert rows["ours"]["max_requests_in_flight"] <= 8 and rows["ours"]["max_bytes_in_flight"] <= 8 << 20
    # (At this tiny size headers, small files and 64 KiB gaps weigh as much as the tensors; the 120B
    # geometry's bytes fetched are in bench_io/results/remote.md.)
    assert rows["ours"]["bytes_fetched"] > doc["bytes_written"]
    assert rows["download"]["bytes_fetched"] >= doc["source_bytes"]
    assert rows["ours-seq"]["predicted_s"] > 0
    assert "| ours |" in (tmp_path / "results" / "remote.md").read_text()
