"""Module weights from checkpoint bytes: which tensors a module needs, reading them, dequantizing.

A module's parameters (the names transformers gives them) are matched to checkpoint tensors by a
:class:`Recipe`: copied as stored, MXFP4 ``_blocks``/``_scales`` pairs (gpt-oss) dequantized,
per-expert tensors (``experts.N.gate_proj`` …, Mixtral's ``w1``/``w3``/``w2``) stacked into the
fused ``gate_up_proj``/``down_proj`` parameters transformers 5 uses, and FP8 weights with a
``weight_scale_inv`` (DeepSeek-V3) dequantized by blocks. Which checkpoint tensors make which
parameter comes first from transformers' own conversion mapping of the model (the renames and
expert merges its loader applies, so every family it loads is matched the way it loads it), then
from the names themselves. Bytes come through the project's
storage layer (:class:`rewriter.storage.Storage`), one ranged read per run of adjacent tensors;
conversion runs on the target device.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from core.checkpoint import Checkpoint, TensorInfo
from core.errors import CheckpointError
from core.storage import Storage

#: FP4 (E2M1) values by nibble, as transformers' MXFP4 integration defines them.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_READ_CHUNK = 64 << 20
#: Per-expert names of the fused parameters' parts: (transformers 5 name, Mixtral name).
_GATE, _UP, _DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")

Kind = Literal["copy", "mxfp4", "gate_up", "down", "concat", "part"]


@dataclass(frozen=True)
class Recipe:
    """How one module parameter is built from checkpoint tensors ``sources``."""

    key: str
    kind: Kind
    sources: tuple[str, ...]
    dtype: torch.dtype  # the parameter's dtype once built
    dim: int = 0  # of a ``concat`` or a ``part``: the dimension the sources are joined or split along
    span: tuple[int, int] = (0, 0)  # of a ``part``: the slice of that dimension that is this parameter


def checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The checkpoint's own compute dtype: that of its embeddings (MXFP4/FP8 models keep those in
    bf16), else the commonest floating dtype among its tensors."""
    for t in ckpt.tensors.values():
        if t.name.endswith("embed_tokens.weight") and t.dtype in _FLOATS:
            return _FLOATS[t.dtype]
    counts: dict[str, int] = {}
    for t in ckpt.tensors.values():
        if t.dtype in _FLOATS:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
    if not counts:
        raise CheckpointError(f"{ckpt.url}: no floating-point tensors; give --dtype")
    return _FLOATS[max(counts, key=lambda d: counts[d])]


def dense_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes the model's weights take once dequantized to ``dtype``: floating tensors (FP8 too)
    and MXFP4 blocks (two values per byte) in ``dtype``; their scales disappear."""
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for t in ckpt.tensors.values():
        if t.name.endswith(("_scales", "_scale_inv")):
            continue
        n = math.prod(t.shape)
        if t.name.endswith("_blocks"):
            total += 2 * n * size
        elif t.dtype in _FLOATS or t.dtype.startswith("F8"):
            total += n * size
        else:
            total += t.nbytes
    return total


#: transformers conversions the streamed engine builds itself: experts stacked (``MergeModulelist``)
#: and, for a fused gate/up parameter, concatenated after stacking (``Concatenate`` on dim 1).
_MERGES = {("MergeModulelist(0)",): 1, ("MergeModulelist(0)", "Concatenate(1)"): 2}


@dataclass(frozen=True)
class Mapped:
    """Checkpoint tensors of one model parameter by transformers' conversion mapping: ``sources``
    in the order its converter merges them (experts, then source patterns), and the converter's
    operations (empty for a plain rename)."""

    sources: tuple[str, ...]
    operations: tuple[str, ...] = ()
    span: tuple[int, int] = (0, 0)  # a Split's part: its slice of dim 0


def _split_parts(conv: Any, key: str, meta: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Each target of a ``Split`` converter (a fused q/k/v tensor): its slice of dim 0, sized like
    the model's parameter, as transformers' ``Split`` cuts it."""
    first = conv.target_patterns[0]
    keys = [key.replace(first, t) for t in conv.target_patterns]
    out, start = {}, 0
    for k in keys:
        n = meta[k].shape[0] if k in meta else 0
        out[k] = (start, start + n)
        start += n
    return out


def _expert_number(name: str) -> int:
    numbers = re.findall(r"\.(\d+)\.", name)
    return int(numbers[-1]) if len(numbers) > 1 else -1


def transformers_names(model: torch.nn.Module, names: Iterable[str]) -> dict[str, Mapped]:
    """Model parameter key -> the checkpoint tensors transformers' loader would build it from."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: (c, i) for c in converters for i, p in enumerate(c.source_patterns)}
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    found: dict[str, list[tuple[int, int, str]]] = {}
    ops: dict[str, tuple[str, ...]] = {}
    parts: dict[str, Mapped] = {}
    for name in names:
        if name.endswith("_scale_inv"):  # FP8 scales travel with their weight (Recipes.sources)
            continue
        key, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if key not in meta and name in meta:
            key, pattern = name, None
        if key not in meta:
            continue
        if pattern is None:
            found.setdefault(key, []).append((-1, 0, name))
            continue
        conv, i = by_pattern[pattern]
        if [f"{type(op).__name__}({getattr(op, 'dim', '')})" for op in conv.operations] == ["Split(0)"]:
            for part, span in _split_parts(conv, key, meta).items():
                parts[part] = Mapped((name,), ("Split(0)",), span)
            continue
        ops[key] = tuple(f"{type(op).__name__}({getattr(op, 'dim', '')})" for op in conv.operations)
        if len(conv.source_patterns) != 1 + (len(ops[key]) == 2):  # not a plain stack or a gate/up pair
            ops[key] += (f"{len(conv.source_patterns)} source patterns",)
        found.setdefault(key, []).append((_expert_number(name), i, name))
    return {**{k: Mapped(tuple(n for *_, n in sorted(v)), ops.get(k, ())) for k, v in found.items()}, **parts}


class Recipes:
    """Matches module parameter names to the checkpoint's tensors (through ``model``'s
    transformers conversion mapping when given)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, fp32_patterns: Iterable[str] = (),
                 model: torch.nn.Module | None = None):
        self.ckpt = ckpt
        self.dtype = dtype
        patterns = list(fp32_patterns)
        self._fp32 = re.compile("|".join(re.escape(p) for p in patterns)) if patterns else None
        self._mapped = transformers_names(model, ckpt.tensors) if model is not None else {}

    def target_dtype(self, key: str, stored: str) -> torch.dtype:
        if stored not in _FLOATS and not stored.startswith("F8") and stored != "U8":
            return TORCH_DTYPES[stored]
        if self._fp32 is not None and self._fp32.search(key):
            return torch.float32
        return self.dtype

    def _find(self, name: str) -> str | None:
        """``name`` or its Mixtral spelling (``block_sparse_moe`` for ``mlp``)."""
        for candidate in (name, name.replace(".mlp.", ".block_sparse_moe.")):
            if candidate in self.ckpt.tensors:
                return candidate
        return None

    def _experts(self, prefix: str, parts: Sequence[tuple[str, str]]) -> tuple[str, ...]:
        """Per-expert tensor names ``prefix.N.part.weight``, parts in order, experts in order."""
        out: list[str] = []
        n = 0
        while True:
            found = []
            for spellings in parts:
                names = [self._find(f"{prefix}.{n}.{s}.weight") for s in spellings]
                hit = next((x for x in names if x), None)
                if hit is None:
                    return tuple(out)
                found.append(hit)
            out += found
            n += 1

    def recipe(self, key: str) -> Recipe:
        """How parameter ``key`` (its full name in the model) is built.

        Raises:
            CheckpointError: no tensor (or tensor group) of the checkpoint provides it.
        """
        mapped = self._from_mapping(key)
        if mapped is not None:
            return mapped
        direct = self._find(key)
        if direct is not None:
            return Recipe(key, "copy", (direct,), self.target_dtype(key, self.ckpt.tensors[direct].dtype))
        blocks, scales = self._find(key + "_blocks"), self._find(key + "_scales")
        if blocks and scales:
            return Recipe(key, "mxfp4", (blocks, scales), self.target_dtype(key, "U8"))
        head, _, leaf = key.rpartition(".")
        if leaf in ("gate_up_proj", "down_proj") and head.endswith("experts"):
            parts = (_GATE, _UP) if leaf == "gate_up_proj" else (_DOWN,)
            names = self._experts(head, parts)
            if names:
                return Recipe(key, "gate_up" if leaf == "gate_up_proj" else "down", names,
                              self.target_dtype(key, self.ckpt.tensors[names[0]].dtype))
        raise CheckpointError(
            f"{self.ckpt.url}: no tensor for the model's parameter {key!r} (looked for it, its "
            f"MXFP4 _blocks/_scales and per-expert tensors); is the checkpoint complete and its "
            f"config.json the right one?"
        )

    def _from_mapping(self, key: str) -> Recipe | None:
        m = self._mapped.get(key)
        if m is None:
            return None
        dtype = self.target_dtype(key, self.ckpt.tensors[m.sources[0]].dtype)
        if not m.operations:
            return Recipe(key, "copy", m.sources[:1], dtype) if len(m.sources) == 1 else None
        if m.operations == ("Split(0)",):
            return Recipe(key, "part", m.sources, dtype, 0, m.span)
        if len(m.operations) == 2 and m.operations[0].startswith("Concatenate(") and m.operations[1].endswith(
                "source patterns"):  # fused projections (q/k/v) joined in pattern order
            return Recipe(key, "concat", m.sources, dtype, int(m.operations[0][12:-1]))
        if m.operations not in _MERGES:  # Transpose, Chunk, family-specific ops
            raise CheckpointError(f"{self.ckpt.url}: transformers builds the model's parameter {key!r} from "
                                  f"{len(m.sources)} tensors with {' + '.join(m.operations)}, which the streamed "
                                  f"engine does not do; run without --streamed")
        return Recipe(key, "gate_up" if len(m.operations) == 2 else "down", m.sources, dtype)

    def sources(self, recipes: Iterable[Recipe]) -> list[TensorInfo]:
        """Every checkpoint tensor the recipes read, FP8 scales included, in storage order."""
        names: set[str] = set()
        for r in recipes:
            for s in r.sources:
                names.add(s)
                scale = s + "_scale_inv"
                if self.ckpt.tensors[s].dtype.startswith("F8") and scale in self.ckpt.tensors:
                    names.add(scale)
        return sorted((self.ckpt.tensors[n] for n in names), key=lambda t: (t.shard, t.begin))


def read_tensors(storage: Storage, infos: Sequence[TensorInfo], pin: bool = False) -> dict[str, torch.Tensor]:
    """Read ``infos`` (storage order) with one ranged read per run of adjacent tensors.

    Returns CPU tensors of the stored dtypes and shapes (pinned when ``pin``).
    """
    out: dict[str, torch.Tensor] = {}
    for run in _runs(infos):
        first, last = run[0], run[-1]
        buf = torch.empty(last.end - first.begin, dtype=torch.uint8, pin_memory=pin)
        read_into(storage, first.shard, first.begin, last.end, memoryview(buf.numpy()))
        for t in run:
            raw = buf[t.begin - first.begin : t.end - first.begin]
            dtype = TORCH_DTYPES.get(t.dtype)
            if dtype is None:
                raise CheckpointError(f"{storage.describe(t.shard)}: tensor {t.name!r} has dtype {t.dtype}, "
                                      f"which this engine cannot compute with")
            if raw.data_ptr() % max(dtype.itemsize, 1):
                raw = raw.clone()
            out[t.name] = raw.view(dtype).reshape(t.shape)
    return out


def _runs(infos: Sequence[TensorInfo]) -> list[list[TensorInfo]]:
    runs: list[list[TensorInfo]] = []
    for t in infos:
        if runs and runs[-1][-1].shard == t.shard and runs[-1][-1].end == t.begin:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def read_into(storage: Storage, name: str, start: int, end: int, out: memoryview) -> None:
    """Bytes ``[start, end)`` of ``name`` into ``out``: ``preadv`` for local files, ranged
    requests of at most 64 MiB elsewhere. Every read is counted by the storage."""
    pos = 0
    while pos < end - start:
        want = min(_READ_CHUNK, end - start - pos)
        if storage.is_local:
            n = os.preadv(storage.fd(name), [out[pos : pos + want]], start + pos)
            storage.counter.add(n)
        else:
            data = storage.read_range(name, start + pos, start + pos + want)
            n = len(data)
            out[pos : pos + n] = data
        if n == 0:
            raise CheckpointError(f"{storage.describe(name)}: ends at byte {start + pos:,}, before the "
                                  f"expected {end:,}; the file is truncated or changed")
        pos += n


def build(recipe: Recipe, stored: Mapping[str, torch.Tensor], device: torch.device | str,
          block: Sequence[int] = (128, 128)) -> torch.Tensor:
    """The parameter of ``recipe`` on ``device`` from stored tensors (CPU or device)."""
    def dense(name: str) -> torch.Tensor:
        t = stored[name].to(device, non_blocking=True)
        scale = stored.get(name + "_scale_inv")
        if scale is not None and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return dequantize_fp8(t, scale.to(device, non_blocking=True), block, recipe.dtype)
        return t.to(recipe.dtype)

    if recipe.kind == "copy":
        return dense(recipe.sources[0])
    if recipe.kind == "part":
        a, b = recipe.span
        return dense(recipe.sources[0]).narrow(recipe.dim, a, b - a).contiguous()
    if recipe.kind == "concat":
        return torch.cat([dense(s) for s in recipe.sources], dim=recipe.dim)
    if recipe.kind == "mxfp4":
        blocks, scales = (stored[s].to(device, non_blocking=True) for s in recipe.sources)
        if blocks.dim() != 4 or blocks.shape[:3] != scales.shape:
            raise CheckpointError(f"{recipe.sources[0]}: MXFP4 blocks {tuple(blocks.shape)} and scales "
                                  f"{tuple(scales.shape)} do not pair up ([E, R, G, 16] and [E, R, G] expected)")
        return dequantize_mxfp4(blocks, scales, recipe.dtype)
    per = 2 if recipe.kind == "gate_up" else 1
    # Each expert goes straight into the fused tensor: building a list and stacking it would hold
    # the layer's experts twice at once (Kimi-K2's gate_up_proj: 2 x 21 GiB in bf16).
    groups = [recipe.sources[i : i + per] for i in range(0, len(recipe.sources), per)]
    first = torch.cat([dense(s) for s in groups[0]], dim=0)
    out = torch.empty((len(groups), *first.shape), dtype=first.dtype, device=first.device)
    out[0].copy_(first)
    del first
    for e, names in enumerate(groups[1:], start=1):
        torch.cat([dense(s) for s in names], dim=0, out=out[e])
    return out


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gpt-oss MXFP4: ``blocks`` [E, R, G, 16] U8 (two E2M1 values per byte, low nibble first),
    ``scales`` [E, R, G] U8 (exponent, bias 127) -> [E, G * 32, R] in ``dtype``.

    Values are exactly those of transformers' own dequantization (same table, ``ldexp``). One
    expert at a time, so temporaries stay at one expert's size next to the result.
    """
    experts, rows, groups, nbytes = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(experts, groups * nbytes * 2, rows, dtype=dtype, device=blocks.device)
    tmp = torch.empty(rows * groups, nbytes * 2, dtype=dtype, device=blocks.device)
    for e in range(experts):
        blk = blocks[e].reshape(rows * groups, nbytes)
        tmp[:, 0::2] = lut[(blk & 0x0F).to(torch.int)]
        tmp[:, 1::2] = lut[(blk >> 4).to(torch.int)]
        torch.ldexp(tmp, scales[e].reshape(rows * groups, 1).to(torch.int32) - 127, out=tmp)
        out[e].copy_(tmp.view(rows, groups * nbytes * 2).t())
    return out


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int],
                   dtype: torch.dtype) -> torch.Tensor:
    """Block-scaled FP8 (DeepSeek-V3): each ``block`` tile of ``weight`` times its ``scale_inv``."""
    rows, cols = weight.shape
    b0, b1 = block
    scale = scale_inv.float().repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def fp8_block(config: Mapping[str, Any]) -> tuple[int, int]:
    """The FP8 weight block of a config (``quantization_config.weight_block_size``), else 128 x 128."""
    q = config.get("quantization_config") or {}
    size = q.get("weight_block_size") if isinstance(q, dict) else None
    if isinstance(size, list) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size):
        return size[0], size[1]
    return 128, 128
