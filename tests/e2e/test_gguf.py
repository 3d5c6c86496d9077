"""GGUF checkpoints: headers read as llama.cpp's ``gguf`` package reads them, pruned by the CLI
into files whose kept experts are the source's bytes, and bad files refused with one line."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from core.checkpoint import Checkpoint
from tests.cli.test_cli_errors import assert_error, invoke
from tests.conftest import cli, tree_digest
from tests.gguf_models import Geometry, moe_tensors, write_gguf

gguf = pytest.importorskip("gguf")

CASES = [("qwen3moe", "F32"), ("qwen3moe", "Q8_0"), ("qwen3moe", "Q4_1"), ("gpt-oss", "MXFP4"),
         ("gpt-oss", "F32")]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {(arch, q): write_gguf(root / f"{arch}-{q}" / "model.gguf", arch, qtype=q) for arch, q in CASES}


def test_block_layouts_are_llama_cpps():
    """Every ggml type this tool slices has the block size and bytes llama.cpp's package states."""
    from core.gguf import GGML_TYPES

    for type_id, (name, block, size) in GGML_TYPES.items():
        kind = gguf.GGMLQuantizationType(type_id)
        assert kind.name == name and gguf.GGML_QUANT_SIZES[kind] == (block, size)


def reader_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in reversed(t.shape)), int(t.data_offset),
                     int(t.n_bytes)) for t in r.tensors}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_header_read_as_gguf_package_reads_it(models, case):
    path = models[case]
    ckpt = Checkpoint.open(str(path))
    assert ckpt.container == "gguf"
    ours = {t.name: (t.dtype, t.shape, t.begin, t.nbytes) for t in ckpt.tensors.values()}
    assert ours == reader_tensors(path)
    assert ckpt.layout.num_experts(ckpt.config) == 8 and sorted(ckpt.layout.moe_layers(ckpt)) == [0, 1]


def expert_rows(path: Path) -> dict[str, list[bytes]]:
    """Each expert-sliced tensor's bytes per expert (rows of the outermost extent)."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if "_exps." in t.name or "ffn_gate_inp" in t.name:
            raw = bytes(np.asarray(t.data).tobytes())
            n = int(t.shape[-1])
            out[t.name] = [raw[i * len(raw) // n:(i + 1) * len(raw) // n] for i in range(n)]
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_prune_keeps_expert_bytes_and_patches_metadata(models, case, tmp_path):
    src = models[case]
    before = tree_digest(src.parent)
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    dst = tmp_path / "out"
    cli("prune", src, dst, "--saliency", sal, "--keep-frac", "0.5")
    assert tree_digest(src.parent) == before
    assert sorted(p.name for p in dst.iterdir()) == ["README.md", "model.gguf", "model.gguf.index.json", "pruning.json"]
    keep = json.loads((dst / "pruning.json").read_text())["expert_mapping"]
    src_rows, out_rows = expert_rows(src), expert_rows(dst / "model.gguf")
    assert src_rows.keys() == out_rows.keys()
    for name, rows in out_rows.items():
        layer = name.split(".")[1]
        assert rows == [src_rows[name][e] for e in keep[layer]], name
    r = gguf.GGUFReader(str(dst / "model.gguf"))
    arch = case[0]
    assert int(r.fields[f"{arch}.expert_count"].parts[-1][0]) == 4
    unchanged = {n: v for n, v in reader_tensors(src).items() if "_exps." not in n and "gate_inp" not in n}
    out = reader_tensors(dst / "model.gguf")
    assert {n: v[:2] for n, v in unchanged.items()} == {n: out[n][:2] for n in unchanged}
    assert "ok" in cli("verify", src, dst).lower()


def test_plan_then_run_resumes_byte_identical(models, tmp_path):
    src = models[("qwen3moe", "Q8_0")]
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    plan = tmp_path / "plan.json"
    cli("plan", src, "--saliency", sal, "--keep-frac", "0.5", "--out", plan)
    doc = json.loads(plan.read_text())
    assert doc["container"] == "gguf" and doc["source"]["url"] == str(src)
    cli("run", plan, "--out", tmp_path / "a")
    cli("run", plan, "--out", tmp_path / "a")  # already complete: nothing rewritten
    cli("run", plan, "--out", tmp_path / "b")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_split_source_gives_split_or_single_output(tmp_path):
    src = write_gguf(tmp_path / "src" / "model.gguf", "qwen3moe", qtype="Q8_0", split_max_size=100_000)
    assert src.name == "model-00001-of-00004.gguf"
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    cli("prune", src, tmp_path / "one", "--saliency", sal, "--keep-frac", "0.5")
    assert (tmp_path / "one" / "model.gguf").exists()
    cli("prune", src, tmp_path / "split", "--saliency", sal, "--keep-frac", "0.5", "--max-shard-size", "60KB")
    parts = sorted(p.name for p in (tmp_path / "split").glob("*.gguf"))
    assert len(parts) > 1 and parts[0] == f"model-00001-of-{len(parts):05d}.gguf"
    for i, name in enumerate(parts):
        fields = gguf.GGUFReader(str(tmp_path / "split" / name)).fields
        assert int(fields["split.no"].parts[-1][0]) == i
        assert int(fields["split.count"].parts[-1][0]) == len(parts)
    assert "qwen3moe.expert_count" in gguf.GGUFReader(str(tmp_path / "split" / parts[0])).fields
    merged = {n: v[:2] for p in parts for n, v in reader_tensors(tmp_path / "split" / p).items()}
    assert merged == {n: v[:2] for n, v in reader_tensors(tmp_path / "one" / "model.gguf").items()}
    cli("verify", src, tmp_path / "split")


# --- bad input -----------------------------------------------------------------------------------

def _damaged(tmp_path: Path, src: Path, edit) -> Path:
    d = tmp_path / "bad"
    d.mkdir()
    data = bytearray(src.read_bytes())
    out = d / "model.gguf"
    out.write_bytes(bytes(edit(data)))
    return out


def _tensor_info_offset(data: bytes, name: str) -> int:
    """Where tensor ``name``'s info starts (its name's length field)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key)


def _type_field(data: bytes, name: str) -> int:
    at = _tensor_info_offset(data, name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims


def _set_type(name: str, type_id: int):
    def edit(data: bytearray) -> bytearray:
        struct.pack_into("<I", data, _type_field(data, name), type_id)
        return data
    return edit


def _shift_offset(name: str, delta: int):
    def edit(data: bytearray) -> bytearray:
        at = _type_field(data, name) + 4
        struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] + delta)
        return data
    return edit


def _absurd_string(data: bytearray) -> bytearray:
    key = b"general.name"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4
    struct.pack_into("<Q", data, at, 1 << 60)
    return data


BAD = {
    "truncated": (lambda d: d[: len(d) - 1000], "truncated"),
    "not gguf": (lambda d: b"GGML" + d[4:], "GGUF magic"),
    "version 2": (lambda d: d[:4] + struct.pack("<I", 2) + d[8:], "version 2"),
    "unknown type": (_set_type("blk.0.ffn_up_exps.weight", 77), "ggml type 77"),
    "overlap": (_shift_offset("blk.1.ffn_up_exps.weight", -32), "overlaps"),
    "gap": (_shift_offset("output.weight", 1 << 40), "leaves a gap"),
    "absurd metadata": (_absurd_string, "general.name"),
    "longer": (lambda d: d + bytes(4096), "longer than its header"),
    "cut in the vocabulary": (lambda d: d[:1500], "tokenizer.ggml.tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_damaged_file_is_one_error_line(models, tmp_path, case):
    edit, words = BAD[case]
    src = _damaged(tmp_path, models[("qwen3moe", "F32")], edit)
    before = src.read_bytes()
    line = assert_error(invoke("prune", src, tmp_path / "out", "--keep-list", tmp_path / "none.json"))
    assert str(src) in line and words in line, line
    assert src.read_bytes() == before and not (tmp_path / "out").exists()
    assert_error(invoke("inspect", src))


def test_expert_extent_must_match_expert_count(models, tmp_path):
    def edit(data: bytearray) -> bytearray:
        key = b"qwen3moe.expert_count"
        at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4
        struct.pack_into("<I", data, at, 6)
        return data
    src = _damaged(tmp_path, models[("qwen3moe", "F32")], edit)
    line = assert_error(invoke("inspect", src))
    assert "expected dim 0 = 6 experts" in line and "qwen3moe.expert_count" in line


def test_split_files_missing_or_from_two_models(tmp_path):
    a = write_gguf(tmp_path / "a" / "model.gguf", "qwen3moe", qtype="Q8_0", split_max_size=100_000)
    b = write_gguf(tmp_path / "b" / "model.gguf", "qwen3moe", Geometry(layers=3), qtype="Q8_0",
                   split_max_size=100_000)
    mixed = tmp_path / "mixed"
    shutil.copytree(a.parent, mixed)
    (mixed / "model-00003-of-00004.gguf").unlink()
    line = assert_error(invoke("inspect", mixed / a.name))
    assert "model-00003-of-00004.gguf" in line and "missing" in line
    shutil.copy(b.parent / "model-00003-of-00005.gguf" if (b.parent / "model-00003-of-00005.gguf").exists()
                else b.parent / "model-00002-of-00004.gguf", mixed / "model-00003-of-00004.gguf")
    line = assert_error(invoke("inspect", mixed / a.name))
    assert "model-00003-of-00004.gguf" in line and ("different models" in line or "split" in line)


def test_folder_with_two_models_asks_for_the_file(models, tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    shutil.copy(models[("qwen3moe", "F32")], d / "a.gguf")
    shutil.copy(models[("qwen3moe", "Q8_0")], d / "b.gguf")
    line = assert_error(invoke("inspect", d))
    assert "2 GGUF models" in line
    assert "qwen3_moe" in cli("inspect", d / "a.gguf")


# --- the other commands on GGUF sources ----------------------------------------------------------

def test_saliency_of_the_hf_checkpoint_applies_to_its_gguf_conversion(models, tiny, tiny_saliency, tmp_path):
    """Experts keep their ids across formats: the same saliency picks the same experts."""
    src = models[("gpt-oss", "MXFP4")]
    cli("prune", src, tmp_path / "g", "--saliency", tiny_saliency, "--keep-frac", "0.5")
    cli("prune", tiny, tmp_path / "s", "--saliency", tiny_saliency, "--keep-frac", "0.5")
    mapping = [json.loads((tmp_path / d / "pruning.json").read_text())["expert_mapping"] for d in ("g", "s")]
    assert mapping[0] == mapping[1]


def test_saliency_of_another_geometry_is_refused_across_formats(tiny_saliency, tmp_path):
    src = write_gguf(tmp_path / "m" / "model.gguf", "gpt-oss", Geometry(experts=16))
    line = assert_error(invoke("prune", src, tmp_path / "out", "--saliency", tiny_saliency, "--keep-frac", "0.5"))
    assert "profiled on another model" in line


def test_saliency_of_another_model_is_refused(models, tmp_path):
    sal = tmp_path / "s.json"
    cli("synth-saliency", models[("qwen3moe", "F32")], "--out", sal)
    line = assert_error(invoke("prune", models[("gpt-oss", "F32")], tmp_path / "out", "--saliency", sal,
                               "--keep-frac", "0.5"))
    assert "profiled on another model" in line and not (tmp_path / "out").exists()


def test_quantizations_of_one_model_share_a_saliency(models, tmp_path):
    sal = tmp_path / "s.json"
    cli("synth-saliency", models[("qwen3moe", "F32")], "--out", sal)
    cli("plan", models[("qwen3moe", "Q8_0")], "--saliency", sal, "--keep-frac", "0.5")


def test_soft_prune_masks_the_router_bias_llama_cpp_reads(models, tmp_path):
    src = models[("gpt-oss", "MXFP4")]
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    cli("soft-prune", src, tmp_path / "soft", "--saliency", sal, "--keep-frac", "0.5")
    keep = json.loads((tmp_path / "soft" / "pruning.json").read_text())["expert_mapping"]
    r = gguf.GGUFReader(str(tmp_path / "soft" / "model.gguf"))
    assert int(r.fields["gpt-oss.expert_count"].parts[-1][0]) == 8
    src_bias = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(src)).tensors if t.name.endswith("gate_inp.bias")}
    for t in r.tensors:
        if t.name.endswith("gate_inp.bias"):
            kept = keep[t.name.split(".")[1]]
            for e, v in enumerate(np.asarray(t.data)):
                assert v == (src_bias[t.name][e] if e in kept else np.finfo(np.float32).min)
    cli("verify", src, tmp_path / "soft")


def test_soft_prune_without_router_bias_is_refused(models, tmp_path):
    src = models[("qwen3moe", "F32")]
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    line = assert_error(invoke("soft-prune", src, tmp_path / "soft", "--saliency", sal, "--keep-frac", "0.5"))
    assert "router bias" in line


def test_dry_run_check_and_card_take_gguf(models, tmp_path):
    src = models[("qwen3moe", "Q8_0")]
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    out = cli("dry-run", src, "--layer", "1", "--saliency", sal, "--keep-frac", "0.5")
    assert "layer" in out
    verdicts = json.loads(cli("check", src, "--target", "llamacpp", "--json", expect=None))
    assert verdicts and all(v["status"] in ("pass", "skip") for v in verdicts["verdicts"]), verdicts
    cli("prune", src, tmp_path / "out", "--saliency", sal, "--keep-frac", "0.5", "--target", "llamacpp")
    cli("check", tmp_path / "out", "--target", "llamacpp")
    cli("card", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: gguf" in card and "- \"gguf\"" in card


def test_check_names_the_gguf_metadata_not_config_json(models, tmp_path):
    out = cli("check", models[("qwen3moe", "F32")], "--target", "llamacpp")
    assert "qwen3moe.expert_count = 8" in out and "qwen3moe.expert_used_count = 2" in out
    # Without the top-k key: the failing rule names where it looked.
    src = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(src), "qwen3moe")
    w.add_block_count(1)
    w.add_expert_count(4)
    for name, arr in moe_tensors("qwen3moe", Geometry(layers=1, experts=4)).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = cli("check", src, "--target", "llamacpp", expect=1)
    assert "the GGUF metadata has none of" in out and "config.json" not in out


def test_destination_named_like_a_gguf_file_is_refused(models, tmp_path):
    src = models[("qwen3moe", "F32")]
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    line = assert_error(invoke("prune", src, tmp_path / "out.gguf", "--saliency", sal, "--keep-frac", "0.5"))
    assert "folder" in line and not (tmp_path / "out.gguf").exists()


def test_split_120b_geometry_plans_from_headers_only(tmp_path):
    from planners import PlanOptions, plan_prune
    from planners.policies import KeepPolicy
    from planners.saliency import model_identity
    from rewriter.tools.gguf_synth import write_gguf_model
    from rewriter.tools.synth import PRESETS, synthetic_saliency

    paths = write_gguf_model(tmp_path / "m", PRESETS["120b"], sparse=True)
    assert len(paths) > 1 and paths[0].name == f"model-00001-of-{len(paths):05d}.gguf"
    ckpt = Checkpoint.open(str(paths[1]))  # any split names the model
    assert len(ckpt.shards) == len(paths) and ckpt.layout.num_experts(ckpt.config) == 128
    sal = tmp_path / "s.json"
    synthetic_saliency(36, 128, 4, model=model_identity(ckpt)).save(sal)
    plan = plan_prune(ckpt, PlanOptions(saliency=(str(sal),), policy=KeepPolicy(keep_frac=0.5)))
    assert ckpt.storage.counter.bytes < 1 << 20  # headers only, of a 65 GB model
    experts = sum(i.nbytes for i in ckpt.tensors.values() if "_exps." in i.name)
    kept = sum(t.nbytes for o in plan.outputs for t in o.tensors if "_exps." in t.name)
    assert kept * 2 == experts


def test_remote_gguf_source_through_fsspec(models, tmp_path):
    import fsspec

    fsspec.filesystem("memory").pipe("/gguf-remote/model.gguf", models[("qwen3moe", "Q8_0")].read_bytes())
    src = "memory://gguf-remote/model.gguf"
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    cli("prune", src, tmp_path / "out", "--saliency", sal, "--keep-frac", "0.5")
    assert json.loads((tmp_path / "out" / "pruning.json").read_text())["source"] == src
    assert "-> OK" in cli("verify", tmp_path / "out")
    cli("prune", models[("qwen3moe", "Q8_0")], tmp_path / "local", "--saliency", sal, "--keep-frac", "0.5")
    assert (tmp_path / "out" / "model.gguf").read_bytes() == (tmp_path / "local" / "model.gguf").read_bytes()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_run_of_a_gguf_plan_matches_the_local_run(ray_cluster, models, tmp_path):
    from planners.plan import Plan
    from rewriter.exec.distributed.ray_executor import execute_on_ray
    from rewriter.exec.run.executor import execute

    src = models[("gpt-oss", "MXFP4")]
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    cli("plan", src, "--saliency", sal, "--keep-frac", "0.5", "--max-shard-size", "40KB", "--out", tmp_path / "p.json")
    plan = Plan.load(str(tmp_path / "p.json"))
    assert len(plan.outputs) > 1
    execute(plan, str(tmp_path / "local"))
    execute_on_ray(plan, str(tmp_path / "ray"), workers=2)
    assert tree_digest(tmp_path / "ray") == tree_digest(tmp_path / "local")
    assert "-> OK" in cli("verify", src, tmp_path / "ray")


def test_destination_beside_the_gguf_file_but_never_its_folder(models, tmp_path):
    src = tmp_path / "m" / "model.gguf"
    src.parent.mkdir()
    shutil.copy(models[("qwen3moe", "F32")], src)
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    before = src.read_bytes()
    line = assert_error(invoke("prune", src, src.parent, "--saliency", sal, "--keep-frac", "0.5", "--force"))
    assert "is the source" in line and src.read_bytes() == before
    cli("prune", src, src.parent / "pruned", "--saliency", sal, "--keep-frac", "0.5")
    assert (src.parent / "pruned" / "model.gguf").exists() and src.read_bytes() == before


def _grouped_gguf(path: Path, arch: str) -> Path:
    """A DeepSeek-V3-style layout (``deepseek2``/``glm4moe``): a dense first layer, then MoE layers
    with shared experts, a selection bias and 16 experts in 4 groups. Only what pruning reads."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    for add, v in ((w.add_block_count, 3), (w.add_expert_count, 16), (w.add_expert_used_count, 2),
                   (w.add_expert_group_count, 4), (w.add_expert_group_used_count, 2), (w.add_expert_shared_count, 1),
                   (w.add_leading_dense_block_count, 1)):
        add(v)
    h, f = 32, 32
    w.add_tensor("token_embd.weight", rng.standard_normal((16, h)).astype(np.float32))
    for name, shape in (("ffn_gate", (f, h)), ("ffn_up", (f, h)), ("ffn_down", (h, f))):
        w.add_tensor(f"blk.0.{name}.weight", rng.standard_normal(shape).astype(np.float32))
    for i in (1, 2):
        p = f"blk.{i}."
        for name, shape in (("ffn_gate_inp.weight", (16, h)), ("exp_probs_b.bias", (16,)),
                            ("ffn_gate_exps.weight", (16, f, h)), ("ffn_up_exps.weight", (16, f, h)),
                            ("ffn_down_exps.weight", (16, h, f)), ("ffn_gate_shexp.weight", (f, h)),
                            ("ffn_up_shexp.weight", (f, h)), ("ffn_down_shexp.weight", (h, f))):
            w.add_tensor(p + name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["deepseek2", "glm4moe"])
def test_group_limited_architectures_keep_groups_balanced(tmp_path, arch):
    src = _grouped_gguf(tmp_path / "model.gguf", arch)
    ckpt = Checkpoint.open(str(src))
    assert ckpt.family == "deepseek_v3" and sorted(ckpt.layout.moe_layers(ckpt)) == [1, 2]
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    cli("prune", src, tmp_path / "out", "--saliency", sal, "--keep-frac", "0.5")
    keep = json.loads((tmp_path / "out" / "pruning.json").read_text())["expert_mapping"]
    for ids in keep.values():
        assert sorted(e // 4 for e in ids) == [0, 0, 1, 1, 2, 2, 3, 3]  # two kept in each of the 4 groups
    out = reader_tensors(tmp_path / "out" / "model.gguf")
    assert out["blk.1.exp_probs_b.bias"][1] == (8,) and out["blk.1.ffn_down_exps.weight"][1] == (8, 32, 32)
    source = reader_tensors(src)
    for name in ("blk.0.ffn_gate.weight", "blk.1.ffn_gate_shexp.weight", "blk.2.ffn_down_shexp.weight"):
        assert out[name][:2] == source[name][:2]
    fields = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf")).fields
    assert int(fields[f"{arch}.expert_count"].parts[-1][0]) == 8
    assert int(fields[f"{arch}.expert_group_count"].parts[-1][0]) == 4
    cli("verify", src, tmp_path / "out")
    cli("soft-prune", src, tmp_path / "soft", "--saliency", sal, "--keep-frac", "0.5")
    bias = [t for t in gguf.GGUFReader(str(tmp_path / "soft" / "model.gguf")).tensors if t.name == "blk.1.exp_probs_b.bias"]
    assert sum(v == np.finfo(np.float32).min for v in np.asarray(bias[0].data)) == 8


@pytest.mark.slow
def test_killed_gguf_prune_resumes_byte_identical(tmp_path):
    from planners.saliency import model_identity
    from rewriter.tools.gguf_synth import write_gguf_model
    from rewriter.tools.synth import PRESETS, synthetic_saliency
    from tests.e2e.test_promises import assert_complete, journal_shards, kill_when, rewriter

    g = PRESETS["small"]
    src = write_gguf_model(tmp_path / "src", g, max_file_bytes=20_000_000)[0]
    sal = tmp_path / "s.json"
    synthetic_saliency(g.num_layers, g.num_experts, g.top_k, model=model_identity(Checkpoint.open(str(src)))).save(sal)
    before = tree_digest(src.parent)

    def args(dst: Path) -> list[object]:
        return ["prune", src, dst, "--saliency", sal, "--keep-frac", "0.5", "--max-shard-size", "6MB", "--quiet"]

    rewriter(*args(tmp_path / "ref"))
    expected = tree_digest(tmp_path / "ref")
    assert len([n for n in expected if n.endswith(".gguf")]) > 2
    killed = 0
    for label, ready in {"mid-shard": lambda d: any((d / ".rewriter" / "tmp").glob("*.part")),
                         "after a shard": lambda d: journal_shards(d) >= 1}.items():
        dst = tmp_path / label.replace(" ", "-")
        status = kill_when([*args(dst), "--no-zero-copy", "--buffer-mib", "1"], lambda r=ready, d=dst: r(d))
        killed += status < 0
        rewriter(*args(dst))
        assert_complete(dst, expected)
    assert killed >= 1, "the runs finished before they could be killed"
    assert tree_digest(src.parent) == before
