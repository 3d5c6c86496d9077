"""Per-layer dry runs."""

from __future__ import annotations

import json

from core.checkpoint import Checkpoint
from rewriter.tools.synth import Geometry, synthetic_saliency, write_checkpoint
from tests.conftest import cli


def test_dry_run_reports_each_layer(tmp_path):
    # 120B per-layer expert geometry is too large for a unit test; 64 experts of a smaller hidden.
    g = Geometry(4, 64, 4, 256, 256, 512, 4, 2, 64, 3_000_000)
    src = tmp_path / "src"
    write_checkpoint(src, g)
    synthetic_saliency(4, 64, 4).save(tmp_path / "s.json")
    out = json.loads(cli("dry-run", src, "--layer", "1", "--layer", "3", "--saliency", tmp_path / "s.json",
                         "--keep-n", "32", "--json"))
    assert [p["layer"] for p in out] == [1, 3]
    c = Checkpoint.open(str(src))
    for probe in out:
        layer = probe["layer"]
        expert_bytes = sum(t.nbytes for n, t in c.tensors.items()
                           if f"layers.{layer}.mlp." in n)
        header = probe["bytes_written"] - probe["bytes_read"]
        assert probe["bytes_read"] == expert_bytes // 2
        assert 0 < header < 4096
        assert probe["source_shards"] == sorted({c.tensors[n].shard for n in c.tensors if f"layers.{layer}.mlp." in n})
        assert probe["peak_rss_bytes"] > 0 and probe["seconds"] > 0 and probe["zero_copy"]
    text = cli("dry-run", src, "--layer", "2", "--saliency", tmp_path / "s.json", "--keep-n", "32",
               "--no-zero-copy", "--scratch", tmp_path / "scratch")
    assert text.splitlines()[0].split()[:3] == ["layer", "source", "shards"]
    assert text.splitlines()[1].startswith("2 ")
    assert not list((tmp_path / "scratch").glob("*.safetensors"))
    assert "per-layer plan" in cli("run", *_layer_plan(src, tmp_path), expect=2)


def _layer_plan(src, tmp_path):
    cli("plan", src, "--saliency", tmp_path / "s.json", "--keep-n", "32", "--layers", "0", "--out", tmp_path / "lp.json")
    return [tmp_path / "lp.json", "--out", tmp_path / "x"]
