"""Synthetic gpt-oss models as GGUF files (llama.cpp's names and types), for benchmarks and tests.

The geometry is :class:`rewriter.tools.synth.Geometry`'s; experts are MXFP4 as in the published gpt-oss
GGUFs, embeddings BF16, norms, biases and the router F32. ``sparse`` leaves holes instead of
data (headers only: planning a 120B-geometry model needs no 65 GB); otherwise tensors hold
pseudo-random bytes. Splits are named and labelled as llama.cpp's split tool does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from core import gguf, gguf_write
from core.gguf_model import output_names
from rewriter.tools.synth import Geometry

ARCH = "gpt-oss"
Item = tuple[str, str, tuple[int, ...]]


def gguf_tensors(g: Geometry) -> list[Item]:
    """``(name, ggml type, row-major shape)`` of every tensor of a gpt-oss model of geometry ``g``."""
    q, kv, e, h, f = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim, g.num_experts, g.hidden, g.intermediate
    out: list[Item] = [("token_embd.weight", "BF16", (g.vocab, h))]
    for i in range(g.num_layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", "F32", (h,)), (p + "attn_q.weight", "BF16", (q, h)),
                (p + "attn_q.bias", "F32", (q,)), (p + "attn_k.weight", "BF16", (kv, h)),
                (p + "attn_k.bias", "F32", (kv,)), (p + "attn_v.weight", "BF16", (kv, h)),
                (p + "attn_v.bias", "F32", (kv,)), (p + "attn_output.weight", "BF16", (h, q)),
                (p + "attn_output.bias", "F32", (h,)), (p + "attn_sinks.weight", "F32", (g.num_heads,)),
                (p + "post_attention_norm.weight", "F32", (h,)), (p + "ffn_gate_inp.weight", "F32", (e, h)),
                (p + "ffn_gate_inp.bias", "F32", (e,))]
        for proj, shape in (("gate", (e, f, h)), ("up", (e, f, h)), ("down", (e, h, f))):
            out += [(p + f"ffn_{proj}_exps.weight", "MXFP4", shape), (p + f"ffn_{proj}_exps.bias", "F32", shape[:2])]
    out += [("output_norm.weight", "F32", (h,)), ("output.weight", "BF16", (g.vocab, h))]
    return out


def _metadata(g: Geometry) -> list[bytes]:
    k = gguf_write.encode_kv
    return [
        k("general.architecture", gguf.T_STRING, ARCH), k("general.name", gguf.T_STRING, "synthetic gpt-oss"),
        k(f"{ARCH}.block_count", gguf.T_UINT32, g.num_layers), k(f"{ARCH}.embedding_length", gguf.T_UINT32, g.hidden),
        k(f"{ARCH}.expert_feed_forward_length", gguf.T_UINT32, g.intermediate),
        k(f"{ARCH}.attention.head_count", gguf.T_UINT32, g.num_heads),
        k(f"{ARCH}.attention.head_count_kv", gguf.T_UINT32, g.num_kv_heads),
        k(f"{ARCH}.expert_count", gguf.T_UINT32, g.num_experts),
        k(f"{ARCH}.expert_used_count", gguf.T_UINT32, g.top_k),
    ]


def _groups(tensors: list[Item], max_bytes: int) -> list[list[Item]]:
    """Greedy fill in order into files of at most ``max_bytes`` of tensor data."""
    groups: list[list[Item]] = [[]]
    size = 0
    for t in tensors:
        n = gguf.tensor_nbytes(t[1], tuple(reversed(t[2])))
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    return groups


def _chunks(nbytes: int, rng: np.random.Generator) -> Iterator[bytes]:
    block = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    for start in range(0, nbytes, len(block)):
        yield block[: min(len(block), nbytes - start)]


def write_gguf_model(folder: Path, g: Geometry, *, sparse: bool = False, max_file_bytes: int | None = None,
                     name: str = "model.gguf", seed: int = 0) -> list[Path]:
    """Write a gpt-oss model of geometry ``g`` into ``folder``; returns its files, first split first.

    ``max_file_bytes`` (default: the geometry's shard size) splits it as llama.cpp's split tool does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    groups = _groups(gguf_tensors(g), max_file_bytes or g.max_shard_bytes)
    names = output_names([name], len(groups))
    rng = np.random.default_rng(seed)
    total = sum(len(grp) for grp in groups)
    paths = []
    for i, (file_name, grp) in enumerate(zip(names, groups)):
        split = ([gguf_write.encode_kv("split.no", gguf.T_UINT16, i), gguf_write.encode_kv("split.count", gguf.T_UINT16, len(groups)),
                  gguf_write.encode_kv("split.tensors.count", gguf.T_INT32, total)] if len(groups) > 1 else [])
        kvs = _metadata(g) + split if i == 0 else split
        head = gguf_write.encode_header(kvs, grp, gguf.DEFAULT_ALIGNMENT)
        sizes = [gguf.tensor_nbytes(d, tuple(reversed(s))) for _, d, s in grp]
        path = folder / file_name
        with open(path, "wb") as f:
            f.write(head)
            if sparse:
                f.truncate(len(head) + sum(n + gguf.padding(n, gguf.DEFAULT_ALIGNMENT) for n in sizes))
            else:
                for n in sizes:
                    for chunk in _chunks(n, rng):
                        f.write(chunk)
                    f.write(bytes(gguf.padding(n, gguf.DEFAULT_ALIGNMENT)))
            os.fsync(f.fileno())
        paths.append(path)
    return paths
