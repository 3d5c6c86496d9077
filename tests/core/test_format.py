"""The safetensors header layer: encoder byte-exactness and every loader rule."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from core.errors import FormatError
from core.format import (
    MAX_HEADER_BYTES,
    encode_header,
    nbytes_of,
    parse_header,
    read_prefix,
    reference_order,
)

NP_TO_ST = {
    np.dtype("bool"): "BOOL", np.dtype("uint8"): "U8", np.dtype("int8"): "I8", np.dtype("int16"): "I16",
    np.dtype("uint16"): "U16", np.dtype("float16"): "F16", np.dtype("int32"): "I32", np.dtype("uint32"): "U32",
    np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("int64"): "I64", np.dtype("uint64"): "U64",
}

CASES = {
    "one_each": {f"t_{d.name}": np.zeros((3, 2), dtype=d) for d in NP_TO_ST},
    "scalar_and_empty": {"scalar": np.array(1.5, dtype=np.float32), "empty": np.zeros((0, 4), np.int64),
                         "vec": np.arange(5, dtype=np.uint8)},
    "names_sorted_within_dtype": {"b": np.zeros(3, np.float16), "a": np.zeros(3, np.float16),
                                  "z": np.zeros(7, np.uint8), "m.layers.10.x": np.zeros(2, np.float32),
                                  "m.layers.2.x": np.zeros(2, np.float32)},
    "unicode": {"ünïcødé.weight": np.zeros(2, np.float32)},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_encoder_matches_safetensors_library(case, metadata):
    tensors = CASES[case]
    ref = save(tensors, metadata=metadata)
    items = reference_order((k, NP_TO_ST[v.dtype], v.shape) for k, v in tensors.items())
    ours = encode_header(items, metadata)
    assert ref[: len(ours)] == ours
    assert len(ref) == len(ours) + sum(v.nbytes for v in tensors.values())


def _file(doc: dict, data: bytes = b"", pad: bool = True) -> bytes:
    body = json.dumps(doc).encode()
    if pad:
        body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


def _parse(blob: bytes):
    n = read_prefix(blob[:8], "f.safetensors", len(blob))
    return parse_header(blob[8 : 8 + n], "f.safetensors", len(blob))


def test_valid_file_parses_with_absolute_offsets():
    blob = _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]},
                  "__metadata__": {"k": "v"}}, b"\0" * 12)
    h = _parse(blob)
    assert [t.name for t in h.tensors] == ["a", "b"]
    assert h.data_start + h.data_len == len(blob)
    assert h.metadata == {"k": "v"}


@pytest.mark.parametrize("dtype,shape,nbytes", [
    ("F4", [4, 2], 4), ("F6_E2M3", [4], 3), ("F8_E4M3", [3], 3), ("F8_E5M2", [3], 3), ("F8_E8M0", [2], 2),
    ("BF16", [], 2), ("C64", [1], 8), ("U64", [2, 0], 0), ("BOOL", [3], 3),
])
def test_dtype_sizes(dtype, shape, nbytes):
    assert nbytes_of(dtype, shape) == nbytes
    blob = _file({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}, b"\1" * nbytes)
    assert _parse(blob).tensors[0].nbytes == nbytes


BAD = {
    "unknown dtype": ({"t": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}, 2, "unknown dtype"),
    "negative dim": ({"t": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, 1, "shape"),
    "shape not list": ({"t": {"dtype": "U8", "shape": "3", "data_offsets": [0, 3]}}, 3, "shape"),
    "offsets reversed": ({"t": {"dtype": "U8", "shape": [0], "data_offsets": [3, 0]}}, 3, "data_offsets"),
    "offsets missing": ({"t": {"dtype": "U8", "shape": [1]}}, 1, "data_offsets"),
    "wrong byte length": ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, "expected 8"),
    "sub-byte leftover": ({"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2, "whole bytes"),
    "hole": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]}}, 5, "leaves a hole"),
    "overlap": ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                 "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, 4, "overlaps"),
    "not from zero": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, 3, "expected 0"),
    "entry not object": ({"a": [1, 2]}, 0, "must be an object"),
    "bool dim": ({"t": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1, "shape"),
    "dim of 2^64": ({"t": {"dtype": "U8", "shape": [2**64], "data_offsets": [0, 1]}}, 1, "shape"),
    "offset of 2^64": ({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 2**64]}}, 1, "data_offsets"),
    "2^64 elements": ({"t": {"dtype": "U8", "shape": [2**32, 2**32], "data_offsets": [0, 1]}}, 1, "2^64 elements"),
    "many huge dims": ({"t": {"dtype": "U8", "shape": [10**19 - 1] * 2000, "data_offsets": [0, 1]}}, 1,
                       "2^64 elements"),
    "float offset": ({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1.0]}}, 1, "data_offsets"),
    "dtype not a string": ({"t": {"dtype": ["U8"], "shape": [1], "data_offsets": [0, 1]}}, 1, "unknown dtype"),
    "a bad entry after good ones": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [2, 6]}}, 6, "expected 8"),
    "metadata not strings": ({"__metadata__": {"k": 1}}, 0, "__metadata__"),
    "extra bytes": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, 5, "longer than its header"),
    "truncated data": ({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}, 3, "truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_rule_rejects_with_file_and_tensor_named(case):
    doc, ndata, message = BAD[case]
    with pytest.raises(FormatError) as e:
        _parse(_file(doc, b"\0" * ndata))
    assert message in str(e.value)
    assert "f.safetensors" in str(e.value)
    names = [k for k in doc if k != "__metadata__"]
    if names and case not in ("extra bytes", "truncated data"):
        assert any(repr(n) in str(e.value) for n in names)


def test_header_length_limit():
    with pytest.raises(FormatError, match="exceeds the limit"):
        read_prefix(struct.pack("<Q", MAX_HEADER_BYTES + 1), "f.safetensors")


def test_header_longer_than_file():
    with pytest.raises(FormatError, match="runs past the end"):
        read_prefix(struct.pack("<Q", 100), "f.safetensors", file_size=50)


def test_file_shorter_than_prefix():
    with pytest.raises(FormatError, match="8-byte header length"):
        read_prefix(b"\1\2", "f.safetensors")


def test_invalid_utf8_and_json_and_non_object():
    with pytest.raises(FormatError, match="UTF-8"):
        parse_header(b"\xff\xfe{}", "f.safetensors")
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_header(b"{nope", "f.safetensors")
    with pytest.raises(FormatError, match="JSON object"):
        parse_header(b"[1, 2]  ", "f.safetensors")


@pytest.mark.parametrize("depth,refused", [(100_000, True), (200, True), (60, False)])
def test_a_header_nested_deeper_than_any_json_read_is_refused(depth, refused):
    """Entries of the usual form are checked in bulk; a header with any other entry (here an
    extra field) is bounded in nesting as every JSON file read is, whatever the stack's depth."""
    extra = "[" * depth + "]" * depth
    raw = ('{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2], "x": ' + extra + "}}").encode()
    if refused:
        with pytest.raises(FormatError, match="f.safetensors: header is not valid JSON.*nested deeper"):
            parse_header(raw, "f.safetensors")
    else:  # a field the loader does not read is ignored
        assert [t.name for t in parse_header(raw, "f.safetensors", 8 + len(raw) + 2).tensors] == ["a"]


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
def test_a_huge_bad_field_is_named_in_one_short_line(field):
    entry = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], field: ["x"] * 1_000_000}
    with pytest.raises(FormatError) as e:
        parse_header(json.dumps({"t": entry}).encode(), "f.safetensors")
    assert "f.safetensors" in str(e.value) and "'t'" in str(e.value) and len(str(e.value)) < 400


def test_encode_rejects_duplicates():
    with pytest.raises(FormatError, match="twice"):
        encode_header([("a", "U8", (1,)), ("a", "U8", (1,))])
