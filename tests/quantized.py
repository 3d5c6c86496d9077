"""Small quantized per-expert MoE checkpoints written in each format's documented tensor layout
(numpy bytes, real safetensors files), and a reference dequantizer per format.

Every expert module ``model.layers.L.mlp.experts.N.{gate,up,down}_proj`` (``out`` x ``in``) is
stored as its format stores a linear layer:

* ``fp8``: ``weight`` F8_E4M3 and ``weight_scale_inv`` F32 [ceil(out/b0), ceil(in/b1)]
  (DeepSeek-V3 / Qwen3 FP8 releases, ``weight_block_size`` [b0, b1]).
* ``compressed-tensors`` (pack-quantized, asymmetric int4, groups of ``GROUP``): ``weight_packed``
  I32 [out, in/8] (8 values per int32, value ``i`` of a word at bits ``4i``, stored + 8),
  ``weight_scale`` BF16 [out, in/GROUP], ``weight_zero_point`` I32 [out/8, in/GROUP] (packed
  along dim 0), ``weight_shape`` I64 [2]; modules in ``ignore`` keep a BF16 ``weight``.
* ``nvfp4`` (ModelOpt): ``weight`` U8 [out, in/2] (two E2M1 values, low nibble first),
  ``weight_scale`` F8_E4M3 [out, in/16], ``weight_scale_2`` F32 [] and ``input_scale`` F32 [].
* ``gptq`` (v1, sym): ``qweight`` I32 [in/8, out], ``qzeros`` I32 [in/GROUP, out/8] (stored
  zero - 1), ``scales`` F16 [in/GROUP, out], ``g_idx`` I32 [in].
* ``awq`` (GEMM): ``qweight`` I32 [in, out/8] and ``qzeros`` I32 [in/GROUP, out/8], columns packed
  in the order 0 2 4 6 1 3 5 7; ``scales`` F16 [in/GROUP, out].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from core.format import encode_header

HIDDEN, INTER, EXPERTS, LAYERS, GROUP = 48, 32, 8, 2, 8
FP8_BLOCK = (20, 20)  # not a divisor of either dimension: the scale grid is rounded up
FORMATS = ("fp8", "compressed-tensors", "nvfp4", "gptq", "awq")
PROJ = {"gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
#: Expert modules compressed-tensors leaves in BF16 (listed in ``ignore``): layer 0's expert 3
#: (kept and renumbered by the tests' keep set) and layer 1's expert 2 (dropped).
CT_IGNORED = ("model.layers.0.mlp.experts.3.down_proj", "model.layers.1.mlp.experts.2.down_proj")
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _fp8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random E4M3 bytes, NaN (0x7F, 0xFF) excluded."""
    b = rng.integers(0, 256, shape, dtype=np.uint8)
    return np.where((b & 0x7F) == 0x7F, b ^ 0x01, b).astype(np.uint8)


def _pack_cols(v: np.ndarray, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """4-bit values [R, C] -> I32 [R, C/8]: value ``order[i]`` of each 8 at bits ``4i``."""
    r, c = v.shape
    g = v.reshape(r, c // 8, 8).astype(np.uint32)
    out = np.zeros((r, c // 8), dtype=np.uint32)
    for i, j in enumerate(order):
        out |= g[:, :, j] << np.uint32(4 * i)
    return out.view(np.int32)


def _unpack_cols(p: np.ndarray, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    r, c8 = p.shape
    u = p.view(np.uint32)
    out = np.zeros((r, c8, 8), dtype=np.int64)
    for i, j in enumerate(order):
        out[:, :, j] = (u >> np.uint32(4 * i)) & 0xF
    return out.reshape(r, c8 * 8)


def expert_tensors(fmt: str, module: str, out: int, inp: int, rng: np.random.Generator) -> list[tuple[str, str, tuple, bytes]]:
    """(name, dtype, shape, bytes) of one linear layer in ``fmt``."""
    if fmt == "fp8":
        grid = (math.ceil(out / FP8_BLOCK[0]), math.ceil(inp / FP8_BLOCK[1]))
        return [(f"{module}.weight", "F8_E4M3", (out, inp), _fp8(rng, (out, inp)).tobytes()),
                (f"{module}.weight_scale_inv", "F32", grid, rng.uniform(1e-3, 1e-2, grid).astype(np.float32).tobytes())]
    if fmt == "compressed-tensors":
        if module in CT_IGNORED:
            return [(f"{module}.weight", "BF16", (out, inp), _bf16(rng.normal(0, 0.1, (out, inp))).tobytes())]
        groups = inp // GROUP
        q = rng.integers(-8, 8, (out, inp))
        zp = rng.integers(-8, 8, (out, groups))
        return [(f"{module}.weight_packed", "I32", (out, inp // 8), _pack_cols(q + 8).tobytes()),
                (f"{module}.weight_scale", "BF16", (out, groups), _bf16(rng.uniform(1e-3, 1e-2, (out, groups))).tobytes()),
                (f"{module}.weight_zero_point", "I32", (out // 8, groups), _pack_cols((zp + 8).T).T.copy().tobytes()),
                (f"{module}.weight_shape", "I64", (2,), np.array([out, inp], dtype=np.int64).tobytes())]
    if fmt == "nvfp4":
        return [(f"{module}.weight", "U8", (out, inp // 2), rng.integers(0, 256, (out, inp // 2), dtype=np.uint8).tobytes()),
                (f"{module}.weight_scale", "F8_E4M3", (out, inp // 16), (_fp8(rng, (out, inp // 16)) & 0x7F).tobytes()),
                (f"{module}.weight_scale_2", "F32", (), np.float32(rng.uniform(1e-3, 1e-2)).tobytes()),
                (f"{module}.input_scale", "F32", (), np.float32(rng.uniform(0.1, 1)).tobytes())]
    groups = inp // GROUP
    scales = rng.uniform(1e-3, 1e-2, (groups, out)).astype(np.float16).tobytes()
    if fmt == "gptq":
        q = rng.integers(0, 16, (inp, out))
        z = rng.integers(0, 16, (groups, out))
        return [(f"{module}.qweight", "I32", (inp // 8, out), _pack_cols(q.T).T.copy().tobytes()),
                (f"{module}.qzeros", "I32", (groups, out // 8), _pack_cols(z).tobytes()),
                (f"{module}.scales", "F16", (groups, out), scales),
                (f"{module}.g_idx", "I32", (inp,), (np.arange(inp) // GROUP).astype(np.int32).tobytes())]
    assert fmt == "awq"
    q = rng.integers(0, 16, (inp, out))
    z = rng.integers(0, 16, (groups, out))
    return [(f"{module}.qweight", "I32", (inp, out // 8), _pack_cols(q, _AWQ_ORDER).tobytes()),
            (f"{module}.qzeros", "I32", (groups, out // 8), _pack_cols(z, _AWQ_ORDER).tobytes()),
            (f"{module}.scales", "F16", (groups, out), scales)]


def quant_config(fmt: str) -> dict:
    gates = [f"model.layers.{i}.mlp.gate" for i in range(LAYERS)]
    return {
        "fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(FP8_BLOCK), "modules_to_not_convert": ["lm_head", *gates]},
        "compressed-tensors": {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": GROUP}}},
            "ignore": ["lm_head", "re:.*mlp.gate$", *CT_IGNORED]},
        "nvfp4": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                  "exclude_modules": ["lm_head", *gates]},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True,
                 "checkpoint_format": "gptq", "modules_to_not_convert": gates},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": gates},
    }[fmt]


def write_quantized(path: Path, fmt: str, seed: int = 0) -> Path:
    """A two-layer Qwen3-MoE checkpoint (8 experts, top-2) whose experts are quantized in ``fmt``."""
    rng = np.random.default_rng(seed)
    items: list[tuple[str, str, tuple, bytes]] = [
        ("model.embed_tokens.weight", "BF16", (64, HIDDEN), _bf16(rng.normal(0, 1, (64, HIDDEN))).tobytes()),
        ("model.norm.weight", "BF16", (HIDDEN,), _bf16(np.ones(HIDDEN)).tobytes()),
        ("lm_head.weight", "BF16", (64, HIDDEN), _bf16(rng.normal(0, 1, (64, HIDDEN))).tobytes())]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}.mlp."
        items.append((p + "gate.weight", "BF16", (EXPERTS, HIDDEN), _bf16(rng.normal(0, 1, (EXPERTS, HIDDEN))).tobytes()))
        for e in range(EXPERTS):
            for proj, (out, inp) in PROJ.items():
                items += expert_tensors(fmt, f"{p}experts.{e}.{proj}", out, inp, rng)
    path.mkdir(parents=True)
    with open(path / "model.safetensors", "wb") as f:
        f.write(encode_header([(n, d, s) for n, d, s, _ in items], {"format": "pt"}))
        for *_, data in items:
            f.write(data)
    cfg = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": HIDDEN,
           "moe_intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_experts": EXPERTS,
           "num_experts_per_tok": 2, "vocab_size": 64, "quantization_config": quant_config(fmt)}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _e4m3(b: np.ndarray) -> np.ndarray:
    """E4M3 (fn) bytes -> float64: sign, 4 exponent bits (bias 7), 3 mantissa bits."""
    b = b.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    normal = (1 + man / 8) * np.exp2(exp - 7.0)
    sub = man / 8 * 2.0**-6
    return sign * np.where(exp == 0, sub, normal)


def _float(dtype: str, raw: bytes, shape: tuple) -> np.ndarray:
    if dtype == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64).reshape(shape)
    return np.frombuffer(raw, {"F16": np.float16, "F32": np.float32}[dtype]).astype(np.float64).reshape(shape)


def dequantize(fmt: str, t: dict[str, tuple[str, tuple, bytes]], config: dict) -> np.ndarray:
    """One linear layer's float64 weight [out, in] from its tensors ``leaf -> (dtype, shape, bytes)``."""
    def raw(leaf: str, np_dtype) -> np.ndarray:
        return np.frombuffer(t[leaf][2], np_dtype).reshape(t[leaf][1])

    if "weight" in t and t["weight"][0] in ("BF16", "F16", "F32"):
        return _float(t["weight"][0], t["weight"][2], t["weight"][1])
    if fmt == "fp8":
        w = _e4m3(raw("weight", np.uint8))
        b0, b1 = config["weight_block_size"]
        s = _float("F32", t["weight_scale_inv"][2], t["weight_scale_inv"][1])
        return w * np.repeat(np.repeat(s, b0, 0), b1, 1)[: w.shape[0], : w.shape[1]]
    if fmt == "compressed-tensors":
        q = _unpack_cols(raw("weight_packed", np.int32)) - 8
        zp = _unpack_cols(raw("weight_zero_point", np.int32).T.copy()).T - 8
        s = _float("BF16", t["weight_scale"][2], t["weight_scale"][1])
        g = config["config_groups"]["group_0"]["weights"]["group_size"]
        return (q - np.repeat(zp, g, 1)) * np.repeat(s, g, 1)
    if fmt == "nvfp4":
        b = raw("weight", np.uint8)
        v = np.empty((b.shape[0], b.shape[1] * 2))
        v[:, 0::2], v[:, 1::2] = FP4[b & 0xF], FP4[b >> 4]
        scale = _e4m3(raw("weight_scale", np.uint8)) * float(_float("F32", t["weight_scale_2"][2], ()))
        return v * np.repeat(scale, 16, 1)
    s = _float("F16", t["scales"][2], t["scales"][1])
    if fmt == "gptq":
        q = _unpack_cols(raw("qweight", np.int32).T.copy()).T
        z = _unpack_cols(raw("qzeros", np.int32)) + 1  # GPTQ v1 stores zero - 1
        g = raw("g_idx", np.int32)
        return ((q - z[g]) * s[g]).T
    q = _unpack_cols(raw("qweight", np.int32), _AWQ_ORDER)
    z = _unpack_cols(raw("qzeros", np.int32), _AWQ_ORDER)
    return ((q - np.repeat(z, GROUP, 0)) * np.repeat(s, GROUP, 0)).T
