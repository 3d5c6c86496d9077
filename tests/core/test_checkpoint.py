"""Opening checkpoints: local and memory://, every consistency rule, the presets, inspect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest

from core.checkpoint import Checkpoint
from core.errors import CheckpointError, FormatError
from rewriter.tools.synth import PRESETS, write_checkpoint
from tests.conftest import REFERENCE, cli


def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d: Path, doc: dict) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(doc))


def test_open_local(tiny):
    c = Checkpoint.open(str(tiny))
    assert len(c.shards) == 3
    assert c.family == "gpt_oss"
    assert c.total_size == _index(tiny)["metadata"]["total_size"]
    t = c.tensors["model.layers.1.mlp.experts.down_proj_blocks"]
    assert t.shape == (8, 64, 2, 16) and t.dtype == "U8" and t.nbytes == 8 * 64 * 2 * 16
    raw = (tiny / t.shard).read_bytes()[t.begin : t.end]
    assert len(raw) == t.nbytes
    assert "tokenizer.json" in c.files and "original/model.safetensors" in c.files


def test_open_memory_filesystem(tiny):
    fs = fsspec.filesystem("memory")
    for p in tiny.rglob("*"):
        if p.is_file():
            fs.pipe_file(f"/ckpt-mem/{p.relative_to(tiny).as_posix()}", p.read_bytes())
    c = Checkpoint.open("memory://ckpt-mem")
    local = Checkpoint.open(str(tiny))
    assert {n: (t.shard, t.begin, t.end) for n, t in c.tensors.items()} == {
        n: (t.shard, t.begin, t.end) for n, t in local.tensors.items()}
    # Headers only: 2 reads per shard + config + index.
    assert c.storage.counter.requests == 2 * 3 + 2


def test_single_file_checkpoint(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(3, np.float32)}, str(tmp_path / "model.safetensors"))
    c = Checkpoint.open(str(tmp_path))
    assert list(c.tensors) == ["a"] and c.tensors["a"].begin > 8


def test_missing_shard(fresh_tiny):
    shard = sorted(fresh_tiny.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{shard.name}'"):
        Checkpoint.open(str(fresh_tiny))


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "a/../../b.safetensors", "C:\\x.safetensors"])
def test_path_traversal_in_index(fresh_tiny, bad):
    doc = _index(fresh_tiny)
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = bad
    _write_index(fresh_tiny, doc)
    with pytest.raises(CheckpointError, match="must be relative paths without '..'"):
        Checkpoint.open(str(fresh_tiny))


def test_tensor_listed_but_absent(fresh_tiny):
    doc = _index(fresh_tiny)
    doc["weight_map"]["model.layers.0.ghost.weight"] = next(iter(doc["weight_map"].values()))
    _write_index(fresh_tiny, doc)
    with pytest.raises(CheckpointError, match="'model.layers.0.ghost.weight'.*no such tensor"):
        Checkpoint.open(str(fresh_tiny))


def test_tensor_in_wrong_shard(fresh_tiny):
    doc = _index(fresh_tiny)
    name = "model.norm.weight"
    other = sorted(set(doc["weight_map"].values()) - {doc["weight_map"][name]})[0]
    doc["weight_map"][name] = other
    _write_index(fresh_tiny, doc)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        Checkpoint.open(str(fresh_tiny))


def test_tensor_stored_in_two_shards_is_named_with_both(fresh_tiny):
    import numpy as np
    from safetensors.numpy import save_file

    doc = _index(fresh_tiny)
    first = doc["weight_map"]["model.norm.weight"]
    save_file({"model.norm.weight": np.zeros(4, np.float32)}, str(fresh_tiny / "zz-extra.safetensors"))
    doc["weight_map"]["model.norm.weight"] = "zz-extra.safetensors"
    doc["metadata"].pop("total_size")
    _write_index(fresh_tiny, doc)
    with pytest.raises(CheckpointError, match=f"'model.norm.weight' is stored in both '{first}' and 'zz-extra"):
        Checkpoint.open(str(fresh_tiny))


def test_tensor_present_but_unlisted(fresh_tiny):
    doc = _index(fresh_tiny)
    del doc["weight_map"]["model.norm.weight"]
    doc["metadata"].pop("total_size")
    _write_index(fresh_tiny, doc)
    with pytest.raises(CheckpointError, match="'model.norm.weight'.*not listed"):
        Checkpoint.open(str(fresh_tiny))


def test_total_size_disagrees(fresh_tiny):
    doc = _index(fresh_tiny)
    doc["metadata"]["total_size"] += 1
    _write_index(fresh_tiny, doc)
    with pytest.raises(CheckpointError, match="total_size"):
        Checkpoint.open(str(fresh_tiny))


def test_index_not_json(fresh_tiny):
    (fresh_tiny / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        Checkpoint.open(str(fresh_tiny))


def test_index_without_weight_map(fresh_tiny):
    _write_index(fresh_tiny, {"metadata": {}})
    with pytest.raises(CheckpointError, match="weight_map"):
        Checkpoint.open(str(fresh_tiny))


def test_truncated_shard_named(fresh_tiny):
    shard = sorted(fresh_tiny.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(FormatError, match=f"{shard.name}.*truncated"):
        Checkpoint.open(str(fresh_tiny))


def test_corrupt_header_named(fresh_tiny):
    shard = sorted(fresh_tiny.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"#")
    with pytest.raises(FormatError, match=f"{shard.name}: header is not valid JSON"):
        Checkpoint.open(str(fresh_tiny))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="neither"):
        Checkpoint.open(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Checkpoint.open(str(tmp_path / "nope"))


def test_unknown_family_named(fresh_tiny):
    cfg = json.loads((fresh_tiny / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (fresh_tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'llama'.*not a supported MoE family"):
        _ = Checkpoint.open(str(fresh_tiny)).layout


def test_20b_preset_reproduces_reference_index(tmp_path):
    ref = json.loads((REFERENCE / "gpt-oss-20b" / "model.safetensors.index.json").read_text())
    index = write_checkpoint(tmp_path, PRESETS["20b"], sparse=True)
    assert index == ref
    assert list(index["weight_map"]) == list(ref["weight_map"])
    assert index["metadata"]["total_size"] == 13_761_264_768
    c = Checkpoint.open(str(tmp_path))
    assert c.total_size == 13_761_264_768
    # Layer 6 spans shards 1 and 2, as in the real checkpoint.
    assert c.tensors["model.layers.6.mlp.experts.gate_up_proj_bias"].shard == "model-00001-of-00002.safetensors"
    assert c.tensors["model.layers.6.mlp.experts.gate_up_proj_blocks"].shard == "model-00002-of-00002.safetensors"
    ref_cfg = json.loads((REFERENCE / "gpt-oss-20b" / "config.json").read_text())
    ours = json.loads((tmp_path / "config.json").read_text())
    for key in ("num_local_experts", "num_experts_per_tok", "hidden_size", "intermediate_size", "vocab_size",
                "num_hidden_layers", "head_dim", "num_attention_heads", "num_key_value_heads", "quantization_config"):
        assert ours[key] == ref_cfg[key], key


def test_120b_preset_geometry(tmp_path):
    index = write_checkpoint(tmp_path, PRESETS["120b"], sparse=True)
    assert index["metadata"]["total_size"] == 65_248_815_744
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 15 and shards[0] == "model-00000-of-00014.safetensors"
    assert sum(p.stat().st_blocks for p in tmp_path.glob("*.safetensors")) * 512 < 10 << 20  # sparse


def test_inspect_120b_reads_only_headers(tmp_path):
    write_checkpoint(tmp_path, PRESETS["120b"], sparse=True)
    out = json.loads(cli("inspect", tmp_path, "--json"))
    headers = 0
    for shard in tmp_path.glob("model-*.safetensors"):
        with open(shard, "rb") as f:
            headers += 8 + int.from_bytes(f.read(8), "little")
    small = (tmp_path / "config.json").stat().st_size + (tmp_path / "model.safetensors.index.json").stat().st_size
    assert out["bytes_read"] == headers + small
    assert out["requests"] == 2 * 15 + 2
    assert out["experts_per_layer"] == 128 and out["top_k"] == 4 and out["moe_layers"] == 36
    assert out["bytes_per_expert"] == 13_242_242
    assert all(1 <= len(layer["shards"]) <= 3 for layer in out["layers"])
    text = cli("inspect", tmp_path)
    assert "13,242,242" in text and "gpt_oss" in text


def test_synth_bytes_differ_per_expert(tiny):
    c = Checkpoint.open(str(tiny))
    t = c.tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    raw = (tiny / t.shard).read_bytes()[t.begin : t.end]
    row = t.nbytes // t.shape[0]
    rows = {raw[i * row : (i + 1) * row] for i in range(t.shape[0])}
    assert len(rows) == t.shape[0]
    other = c.tensors["model.layers.1.mlp.experts.gate_up_proj_blocks"]
    raw1 = (tiny / other.shard).read_bytes()[other.begin : other.begin + row]
    assert raw1 != raw[:row]


def test_synth_is_deterministic(tmp_path):
    write_checkpoint(tmp_path / "a", PRESETS["tiny"])
    write_checkpoint(tmp_path / "b", PRESETS["tiny"])
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()


def test_synth_cli_layers_keeps_layer_geometry(tmp_path):
    out = cli("synth", "--preset", "120b", "--layers", "2", "--sparse", tmp_path / "c")
    assert "2 layers x 128 experts" in out
    c = Checkpoint.open(str(tmp_path / "c"))
    assert c.tensors["model.layers.1.mlp.experts.gate_up_proj_blocks"].shape == (128, 5760, 90, 16)
    cli("synth", "--preset", "nope", tmp_path / "d", expect=2)
    shutil.rmtree(tmp_path / "c")
