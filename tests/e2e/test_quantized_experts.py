"""Quantized experts as bytes: FP8 with block scales, compressed-tensors packed int4, NVFP4, GPTQ and
AWQ. Each checkpoint is written in its format's documented layout (``tests/quantized.py``), pruned
with the CLI, and every kept expert's tensors (all suffixes) are compared with the source's:
the same bytes under the renumbered name, and the same values once dequantized. The
``quantization_config`` names that hold expert numbers follow the experts, and ``check`` judges
the output consistent (and a stale config not)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.checkpoint import Checkpoint
from tests.conftest import cli
from tests.planners.test_serving import run_check
from tests.quantized import (
    CT_IGNORED,
    FORMATS,
    LAYERS,
    PROJ,
    dequantize,
    quant_config,
    write_quantized,
)

#: Layer 0 keeps expert 3 (left unquantized by compressed-tensors; renumbered to 1); layer 1
#: drops expert 2 (its unquantized entry must leave the ignore list).
KEEP = {0: [1, 3, 4, 6], 1: [1, 4, 5, 7]}


def expert_tensors(path: Path, layer: int, expert: int, proj: str) -> dict[str, tuple[str, tuple, bytes]]:
    """Every tensor of one expert module: leaf -> (dtype, shape, bytes)."""
    ckpt = Checkpoint.open(str(path))
    prefix = f"model.layers.{layer}.mlp.experts.{expert}.{proj}."
    out = {}
    for t in ckpt.tensors.values():
        if t.name.startswith(prefix):
            with open(path / t.shard, "rb") as f:
                f.seek(t.begin)
                out[t.name[len(prefix):]] = (t.dtype, tuple(t.shape), f.read(t.end - t.begin))
    return out


def prune(src: Path, dst: Path, tmp: Path, *extra: str, expect: int = 0) -> str:
    (tmp / "keep.json").write_text(json.dumps({str(k): v for k, v in KEEP.items()}))
    return cli("prune", src, dst, "--keep-list", tmp / "keep.json", "--quiet", *extra, expect=expect)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kept_experts_keep_every_tensor_and_dequantize_to_the_same_values(fmt, tmp_path):
    src, dst = write_quantized(tmp_path / "src", fmt), tmp_path / "dst"
    prune(src, dst, tmp_path, "--target", "transformers", "--target", "vllm")
    assert "OK" in cli("verify", src, dst)
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    names = set(Checkpoint.open(str(dst)).tensors)
    for layer in range(LAYERS):
        for new, old in enumerate(KEEP[layer]):
            for proj in PROJ:
                want, got = expert_tensors(src, layer, old, proj), expert_tensors(dst, layer, new, proj)
                assert len(want) >= (1 if f"model.layers.{layer}.mlp.experts.{old}.{proj}" in CT_IGNORED else 2)
                assert got == want, (fmt, layer, old, proj)
                np.testing.assert_array_equal(dequantize(fmt, got, qc), dequantize(fmt, want, qc))
                assert np.isfinite(dequantize(fmt, got, qc)).all()
        assert not any(f"layers.{layer}.mlp.experts.{n}." in name for n in range(4, 8) for name in names)
    assert config["num_experts"] == 4
    if fmt == "compressed-tensors":  # expert 3 of layer 0 is now expert 1; layer 1's expert 2 is gone
        assert qc["ignore"] == ["lm_head", "re:.*mlp.gate$", "model.layers.0.mlp.experts.1.down_proj"]
        assert {k: v for k, v in qc.items() if k != "ignore"} == {
            k: v for k, v in quant_config(fmt).items() if k != "ignore"}
    else:
        assert qc == quant_config(fmt)
    code, doc = run_check(dst, "--target", "transformers", "--target", "vllm")
    verdicts = {(v["target"], v["rule"]): v["status"] for v in doc["verdicts"]}
    assert code == 0 and verdicts[("vllm", "quantization-modules")] == "pass"
    assert verdicts[("transformers", "quantization-config")] == "pass"


def test_dequantizers_read_the_documented_layouts():
    """The reference dequantizers against values written by hand (so a wrong unpacking fails)."""
    from tests.quantized import _AWQ_ORDER, _pack_cols, _unpack_cols

    v = np.arange(16).reshape(1, 16) % 16
    packed = _pack_cols(v)
    assert packed.view(np.uint32)[0, 0] == 0x76543210  # value i of a word at bits 4i
    assert packed.view(np.uint32)[0, 1] == 0xFEDCBA98
    assert _pack_cols(v[:, :8], _AWQ_ORDER).view(np.uint32)[0, 0] == 0x75316420
    assert (_unpack_cols(_pack_cols(v, _AWQ_ORDER), _AWQ_ORDER) == v).all()
    scale = np.float32(0.5).tobytes()
    fp8 = {"weight": ("F8_E4M3", (1, 2), bytes([0x38, 0xC0])), "weight_scale_inv": ("F32", (1, 1), scale)}
    assert dequantize("fp8", fp8, {"weight_block_size": [128, 128]}).tolist() == [[0.5, -1.0]]  # 1.0, -2.0 x 0.5
    nv = {"weight": ("U8", (1, 8), bytes([0x72] + [0] * 7)), "weight_scale": ("F8_E4M3", (1, 1), bytes([0x40])),
          "weight_scale_2": ("F32", (), scale)}
    assert dequantize("nvfp4", nv, {})[0, :2].tolist() == [1.0 * 2 * 0.5, 6.0 * 2 * 0.5]  # low nibble first


def test_a_stale_ignore_list_fails_check(tmp_path):
    """The source's ignore list on the pruned output names expert modules that are now quantized
    ones, and leaves the renumbered unquantized expert out: a loader would read the wrong tensors."""
    src, dst = write_quantized(tmp_path / "src", "compressed-tensors"), tmp_path / "dst"
    prune(src, dst, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quant_config("compressed-tensors")
    (dst / "config.json").write_text(json.dumps(cfg))
    code, doc = run_check(dst, "--target", "vllm")
    bad = [v for v in doc["verdicts"] if v["status"] == "fail"]
    assert code == 1 and [v["rule"] for v in bad] == ["quantization-modules"]
    assert "model.layers.0.mlp.experts.3.down_proj" in bad[0]["message"] and "quantized" in bad[0]["message"]
    out = cli("check", dst, "--target", "transformers", expect=1)
    assert "quantization-modules" in out and "FAIL" in out


@pytest.mark.parametrize("fmt, edit", [
    ("compressed-tensors", lambda q: q["ignore"].append("re:model.layers.0.mlp.experts.[0-2].down_proj")),
    ("gptq", lambda q: q.update(dynamic={"-:model\\.layers\\.1\\.mlp\\.experts\\.5\\..*": {}})),
])
def test_a_regex_that_picks_experts_by_number_is_refused(fmt, edit, tmp_path):
    src = write_quantized(tmp_path / "src", fmt)
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg["quantization_config"])
    (src / "config.json").write_text(json.dumps(cfg))
    out = prune(src, tmp_path / "dst", tmp_path, expect=2)
    assert out.startswith("error: ") and len(out.strip().splitlines()) == 1 and "Traceback" not in out
    assert "picks experts by number" in out and "replace it in quantization_config" in out
    assert not (tmp_path / "dst").exists()
    out = cli("plan", src, "--keep-list", tmp_path / "keep.json", "--out", tmp_path / "plan.json", expect=2)
    assert "picks experts by number" in out and not (tmp_path / "plan.json").exists()


def test_per_expert_tensors_where_the_family_fuses_experts_are_refused(tmp_path):
    """A Llama-4 checkpoint whose experts are stored one by one (as FP8 releases of fused families
    may be) under a layout that fuses them: refused naming a tensor, never copied unpruned."""
    from core.format import encode_header, nbytes_of

    items = [("model.embed_tokens.weight", "BF16", (16, 8)), ("model.norm.weight", "BF16", (8,)),
             ("model.layers.0.feed_forward.router.weight", "BF16", (4, 8))]
    items += [(f"model.layers.0.feed_forward.experts.{e}.{p}.{leaf}", dtype, shape)
              for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")
              for leaf, dtype, shape in (("weight", "F8_E4M3", (8, 8)), ("weight_scale", "F32", (8, 1)))]
    src = tmp_path / "src"
    src.mkdir()
    head = encode_header(items)
    with open(src / "model.safetensors", "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(nbytes_of(d, s) for _, d, s in items))
    (src / "config.json").write_text(json.dumps({"model_type": "llama4_text", "num_local_experts": 4,
                                                 "num_experts_per_tok": 1, "quantization_config": {
                                                     "quant_method": "compressed-tensors"}}))
    (tmp_path / "keep.json").write_text(json.dumps({"0": [0, 2]}))
    for args in (("inspect", src), ("prune", src, tmp_path / "dst", "--keep-list", tmp_path / "keep.json")):
        out = cli(*args, expect=2)
        assert out.startswith("error: ") and "Traceback" not in out
        assert "'model.layers.0.feed_forward.experts.0.gate_proj.weight" in out and "stores experts fused" in out
    assert not (tmp_path / "dst").exists()


def test_modelopt_side_file_is_copied_or_refused_when_it_names_experts(tmp_path):
    """ModelOpt's hf_quant_config.json is copied as it is: accepted while its exclude list names no
    expert by number, refused (naming the file) once it does."""
    src = write_quantized(tmp_path / "src", "nvfp4")
    side = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                                "exclude_modules": ["lm_head", "model.layers.0.mlp.gate"]}}
    (src / "hf_quant_config.json").write_text(json.dumps(side))
    prune(src, tmp_path / "dst", tmp_path)
    assert json.loads((tmp_path / "dst" / "hf_quant_config.json").read_text()) == side
    side["quantization"]["exclude_modules"].append("model.layers.1.mlp.experts.5.down_proj")
    (src / "hf_quant_config.json").write_text(json.dumps(side))
    out = prune(src, tmp_path / "dst2", tmp_path, expect=2)
    assert out.startswith("error: ") and "hf_quant_config.json" in out and "name experts by number" in out
    assert not (tmp_path / "dst2").exists()


def _mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 rows: two E2M1 values per byte (low nibble first) times 2^(scale - 127) per 32."""
    from tests.quantized import FP4

    v = np.empty((*blocks.shape[:-1], blocks.shape[-1] * 2))
    v[..., 0::2], v[..., 1::2] = FP4[blocks & 0xF], FP4[blocks >> 4]
    return v * np.exp2(scales.astype(np.float64) - 127)[..., None]


def test_mxfp4_fused_rows_move_with_their_experts(tmp_path):
    """gpt-oss MXFP4: every fused tensor (blocks, scales, biases) and the router keep exactly the
    kept experts' rows, in order, and the kept blocks dequantize to the source's values."""
    from rewriter.tools.synth import PRESETS, write_checkpoint

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_checkpoint(src, PRESETS["tiny"])
    prune(src, dst, tmp_path, "--target", "vllm", "--target", "transformers")
    a, b = Checkpoint.open(str(src)), Checkpoint.open(str(dst))

    def rows(ckpt: Checkpoint, path: Path, name: str) -> np.ndarray:
        t = ckpt.tensors[name]
        with open(path / t.shard, "rb") as f:
            f.seek(t.begin)
            return np.frombuffer(f.read(t.end - t.begin), np.uint8).reshape(t.shape[0], -1)

    sliced = [n for n in a.tensors if a.layout.classify(n) is not None]
    assert any(n.endswith("_blocks") for n in sliced) and any(n.endswith("router.weight") for n in sliced)
    for name in sliced:
        layer = a.layout.classify(name).layer
        assert (rows(b, dst, name) == rows(a, src, name)[KEEP[layer]]).all(), name
        if name.endswith("_blocks"):
            assert len({r.tobytes() for r in rows(a, src, name)}) == 8  # experts differ: dropping one shows
            shape = a.tensors[name].shape
            scales = name.replace("_blocks", "_scales")
            got = _mxfp4(rows(b, dst, name).reshape(4, *shape[1:]), rows(b, dst, scales).reshape(4, *shape[1:3]))
            want = _mxfp4(rows(a, src, name).reshape(shape), rows(a, src, scales).reshape(shape[:3]))[KEEP[layer]]
            np.testing.assert_array_equal(got, want)
    assert json.loads((dst / "config.json").read_text())["quantization_config"] == a.config["quantization_config"]
    code, _ = run_check(dst, "--target", "vllm", "--target", "transformers")
    assert code == 0


def test_compressed_tensors_reads_the_written_layout_as_the_reference_does(tmp_path):
    """compressed-tensors' own unpacking and dequantization of a kept expert of the pruned output
    give the reference dequantizer's values (so the layout written here is the library's)."""
    pytest.importorskip("compressed_tensors")
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    src, dst = write_quantized(tmp_path / "src", "compressed-tensors"), tmp_path / "dst"
    prune(src, dst, tmp_path)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**qc["config_groups"]["group_0"]["weights"])
    for layer, expert, proj in ((0, 0, "gate_proj"), (1, 3, "down_proj")):
        t = expert_tensors(dst, layer, expert, proj)

        def tensor(leaf: str, np_dtype, t=t) -> torch.Tensor:
            return torch.from_numpy(np.frombuffer(t[leaf][2], np_dtype).reshape(t[leaf][1]).copy())

        out, inp = (int(v) for v in np.frombuffer(t["weight_shape"][2], np.int64))
        groups = t["weight_scale"][1][1]
        q = unpack_from_int32(tensor("weight_packed", np.int32), 4, torch.Size((out, inp)))
        zp = unpack_from_int32(tensor("weight_zero_point", np.int32), 4, torch.Size((out, groups)), packed_dim=0)
        scale = tensor("weight_scale", np.int16).view(torch.bfloat16).float()
        got = ct_dequantize(q, scale, zp, args=args, dtype=torch.float64)
        np.testing.assert_allclose(got.numpy(), dequantize("compressed-tensors", t, qc), rtol=1e-12)
