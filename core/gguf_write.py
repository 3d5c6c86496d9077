"""Writing GGUF headers: metadata entries, tensor infos at aligned offsets, a source header's metadata patched."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from core.errors import FormatError
from core.gguf import (
    MAGIC,
    T_BOOL,
    T_FLOAT32,
    T_STRING,
    T_UINT32,
    TYPE_IDS,
    VALUE_TYPES,
    VERSION,
    GGUFHeader,
    padding,
    tensor_nbytes,
)


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_kv(key: str, vtype: int, value: Any) -> bytes:
    """One metadata entry of a scalar or string ``value`` of type ``vtype``."""
    code = VALUE_TYPES[vtype][1]
    if code is None:
        if vtype != T_STRING:
            raise FormatError(f"metadata {key!r}: only scalars and strings are rewritten")
        body = _string(value)
    else:
        body = struct.pack(code, value)
    return _string(key) + struct.pack("<I", vtype) + body


def encode_header(kvs: Sequence[bytes], tensors: Sequence[tuple[str, str, Sequence[int]]],
                  alignment: int) -> bytes:
    """A version-3 header: metadata entries as encoded, then infos of ``(name, dtype, shape)``
    (row-major shapes) laid out one after another at aligned offsets, then the padding.

    The data of each tensor goes at its offset, followed by zeros up to the next multiple of
    ``alignment`` (as llama.cpp and the ``gguf`` package write).
    """
    parts = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(kvs)), *kvs]
    offset = 0
    for name, dtype, shape in tensors:
        ne = tuple(reversed(tuple(shape)))
        nbytes = tensor_nbytes(dtype, ne, f"tensor {name!r}: ")
        parts += [_string(name), struct.pack("<I", len(ne)), struct.pack(f"<{len(ne)}Q", *ne),
                  struct.pack("<IQ", TYPE_IDS[dtype], offset)]
        offset += nbytes + padding(nbytes, alignment)
    head = b"".join(parts)
    return head + b"\0" * padding(len(head), alignment)


def _new_type(key: str, value: Any) -> int:
    for vtype, kind in ((T_BOOL, bool), (T_UINT32, int), (T_FLOAT32, float), (T_STRING, str)):
        if isinstance(value, kind):
            return vtype
    raise FormatError(f"metadata {key!r}: cannot store {value!r} in a GGUF header")


def patched_kvs(header: GGUFHeader, patch: Mapping[str, Any], drop: Sequence[str] = (),
                extra: Sequence[bytes] = ()) -> list[bytes]:
    """The header's metadata entries with ``patch`` applied (each keeps its type; a new key is a
    bool, uint32, float32 or string by its value), keys starting with any of ``drop`` left out,
    then ``extra`` (encoded entries)."""
    out, done = [], set()
    for kv in header.kvs:
        if kv.key.startswith(tuple(drop)):
            continue
        if kv.key in patch:
            out.append(encode_kv(kv.key, kv.vtype, patch[kv.key]))
            done.add(kv.key)
        else:
            out.append(kv.raw)
    out += [encode_kv(k, _new_type(k, v), v) for k, v in patch.items() if k not in done]
    return out + list(extra)
