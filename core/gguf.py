"""The GGUF file format (llama.cpp): parse, validate and encode headers without touching tensor data.

Layout of a file (version 3): ``GGUF`` magic, ``u32`` version, ``u64`` tensor count, ``u64``
metadata count; the metadata (key string, ``u32`` value type, value); the tensor infos (name,
``u32`` dimension count, ``u64`` extents innermost first, ``u32`` ggml type, ``u64`` offset); zero
padding to ``general.alignment`` (32 by default); the data section. Strings are a ``u64`` length
and UTF-8 bytes; every number is little-endian.

Every tensor type stores blocks along the innermost dimension, so with the extents reversed into
row-major order (:attr:`GGUFTensor.shape`), dim 0 is the outermost and each of its rows is one
contiguous byte range whatever the quantization: that is what lets experts be sliced as bytes.

:func:`parse_header` applies llama.cpp's loader rules (``gguf.cpp``): tensors follow each other in
the order of their infos, each at the next multiple of the alignment, inside the file.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import FormatError

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32
#: The largest header this tool reads: a vocabulary of a million tokens takes some tens of MB.
MAX_HEADER_BYTES = 512 * 1024 * 1024
#: llama.cpp's GGML_MAX_DIMS.
MAX_DIMS = 4

#: ggml type id -> (name, elements per block, bytes per block): the types llama.cpp writes to
#: files today (ggml.h). Ids not listed (removed Q4_2/Q4_3, types of the future) are refused:
#: a block size this tool does not know cannot be proven to keep each expert contiguous.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}

# Metadata value types: id -> (name, struct code or None for string/array).
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"), 4: ("UINT32", "<I"),
    5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"), 8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d"),
}
T_UINT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY = 2, 4, 5, 6, 7, 8, 9
#: Arrays up to this many elements appear in :meth:`GGUFHeader.config` (the vocabulary does not).
CONFIG_ARRAY_LIMIT = 64


@dataclass(frozen=True)
class KV:
    """One metadata entry: its key, value type, decoded value and its bytes as found. Arrays of
    more than :data:`CONFIG_ARRAY_LIMIT` elements (the vocabulary) are checked, not decoded:
    their value is ``None``."""

    key: str
    vtype: int
    value: Any
    raw: bytes


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor info; ``offset`` is relative to the data section."""

    name: str
    dtype: str
    ne: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Extents outermost first (PyTorch order)."""
        return tuple(reversed(self.ne))


@dataclass(frozen=True)
class GGUFHeader:
    """A parsed, validated GGUF header: ``data_start`` is the absolute offset of the data section."""

    version: int
    kvs: tuple[KV, ...]
    tensors: tuple[GGUFTensor, ...]
    alignment: int
    data_start: int

    def get(self, key: str, default: Any = None) -> Any:
        for kv in self.kvs:
            if kv.key == key:
                return kv.value
        return default

    def config(self) -> dict[str, Any]:
        """The metadata a plan records and compares: every value but long arrays and ``split.*``."""
        return {kv.key: kv.value for kv in self.kvs if not kv.key.startswith("split.") and kv.value is not None}


def tensor_nbytes(dtype: str, ne: Sequence[int], where: str = "") -> int:
    """Bytes of a tensor of ggml type ``dtype`` with extents ``ne`` (innermost first).

    Raises:
        FormatError: an unknown type, or an innermost extent that is not a whole number of blocks.
    """
    if dtype not in TYPE_IDS:
        raise FormatError(f"{where}unknown ggml type {dtype!r}")
    _, block, size = GGML_TYPES[TYPE_IDS[dtype]]
    if ne and ne[0] % block:
        raise FormatError(f"{where}innermost extent {ne[0]} is not a multiple of the {dtype} block size {block}")
    return math.prod(ne[1:]) * (ne[0] // block if ne else 1) * size


def padding(n: int, alignment: int) -> int:
    return -n % alignment


class _Cursor:
    """Reads the header front to back from ``fetch(start, end)``, fetching more as needed."""

    def __init__(self, fetch: Any, size: int, where: str):
        self.fetch, self.size, self.where = fetch, size, where
        self.buf = b""
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.size:
            raise FormatError(f"{self.where}: {what} at byte {self.pos:,} needs {n:,} bytes, but the file "
                              f"ends at {self.size:,}; the file is truncated or corrupt")
        if self.pos + n > MAX_HEADER_BYTES:
            raise FormatError(f"{self.where}: {what} at byte {self.pos:,} makes the header larger than "
                              f"{MAX_HEADER_BYTES:,} bytes; not a GGUF file this tool reads")
        if self.pos + n > len(self.buf):
            want = min(self.size, max(self.pos + n, 2 * len(self.buf), 64 << 10))
            self.buf += self.fetch(len(self.buf), want)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` strings, each checked to lie inside the file, decoding none."""
        for _ in range(count):
            if self.pos + 8 > len(self.buf):
                self.take(8, f"{what} length")
                self.pos -= 8
            (n,) = struct.unpack_from("<Q", self.buf, self.pos)
            self.pos += 8
            if self.pos + n > len(self.buf):
                self.take(n, what)
            else:
                self.pos += n

    def num(self, code: str, what: str) -> Any:
        return struct.unpack(code, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> bytes:
        n = self.num("<Q", f"{what} length")
        return self.take(n, what)

    def text(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.where}: {what} at byte {self.pos - len(raw):,} is not UTF-8") from None


def _value(c: _Cursor, vtype: int, what: str) -> Any:
    if vtype not in VALUE_TYPES:
        raise FormatError(f"{c.where}: {what} has value type {vtype}; expected one of 0..12")
    code = VALUE_TYPES[vtype][1]
    if code is not None:
        return c.num(code, what)
    if vtype == T_STRING:
        return c.string(what).decode("utf-8", errors="replace")
    etype = c.num("<I", f"{what} element type")
    count = c.num("<Q", f"{what} element count")
    if etype == T_ARRAY:
        raise FormatError(f"{c.where}: {what} is an array of arrays, which llama.cpp does not read")
    ecode = VALUE_TYPES.get(etype, ("", None))[1]
    if ecode is not None:
        size = struct.calcsize(ecode)
        data = c.take(size * count, f"{what} ({count:,} elements)")
        return [v[0] for v in struct.iter_unpack(ecode, data)] if count <= CONFIG_ARRAY_LIMIT else None
    if etype != T_STRING:
        raise FormatError(f"{c.where}: {what} has element type {etype}; expected one of 0..12")
    if count * 8 > c.size - c.pos:
        raise FormatError(f"{c.where}: {what} declares {count:,} strings, more than the file can hold; "
                          f"the file is corrupt")
    if count > CONFIG_ARRAY_LIMIT:
        c.skip_strings(count, f"{what} element")
        return None
    return [c.string(f"{what}[{i}]").decode("utf-8", errors="replace") for i in range(count)]


def _tensor_info(c: _Cursor, i: int) -> tuple[str, str, tuple[int, ...], int]:
    name = c.text(f"tensor info {i} name")
    where = f"tensor {name!r}"
    n_dims = c.num("<I", f"{where} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise FormatError(f"{c.where}: {where} has {n_dims} dimensions; expected 1 to {MAX_DIMS}")
    ne = tuple(c.num("<Q", f"{where} extent") for _ in range(n_dims))
    if any(d >= 1 << 62 for d in ne) or math.prod(ne) >= 1 << 62:
        raise FormatError(f"{c.where}: {where} has extents {list(ne)}, too large for any file")
    type_id = c.num("<I", f"{where} type")
    if type_id not in GGML_TYPES:
        known = ", ".join(n for n, _, _ in GGML_TYPES.values())
        raise FormatError(f"{c.where}: {where} has ggml type {type_id}, which this tool does not know; "
                          f"it slices only types whose block layout it knows ({known})")
    offset = c.num("<Q", f"{where} offset")
    return name, GGML_TYPES[type_id][0], ne, offset


def parse_header(fetch: Any, size: int, where: str) -> tuple[GGUFHeader, bytes]:
    """Parse and validate the header of a GGUF file of ``size`` bytes.

    Args:
        fetch: ``fetch(start, end)`` returns bytes ``[start, end)`` of the file (a ranged read).
        size: the file's size.
        where: the file's name or URL, for error messages.

    Returns:
        The header and its bytes (the padding before the data section included).

    Raises:
        FormatError: naming ``where`` and the field or tensor at fault.
    """
    c = _Cursor(fetch, size, where)
    if c.take(4, "magic") != MAGIC:
        raise FormatError(f"{where}: does not start with the GGUF magic; not a GGUF file")
    version = c.num("<I", "version")
    if version != VERSION:
        raise FormatError(f"{where}: GGUF version {version}; this tool reads version {VERSION} "
                          f"(convert the file again with a current llama.cpp)")
    n_tensors = c.num("<Q", "tensor count")
    n_kv = c.num("<Q", "metadata count")
    # Each entry takes at least 8 + 4 (+ 8 + 4 + 8 for a tensor) bytes: absurd counts stop here.
    if n_kv * 12 + n_tensors * 32 > size:
        raise FormatError(f"{where}: declares {n_kv:,} metadata entries and {n_tensors:,} tensors, more "
                          f"than its {size:,} bytes can hold; the file is corrupt")
    kvs = []
    for i in range(n_kv):
        start = c.pos
        key = c.text(f"metadata key {i}")
        vtype = c.num("<I", f"metadata {key!r} type")
        value = _value(c, vtype, f"metadata {key!r}")
        kvs.append(KV(key, vtype, value, c.buf[start:c.pos]))
    _check_keys(kvs, where)
    alignment = _alignment(kvs, where)
    infos = [_tensor_info(c, i) for i in range(n_tensors)]
    c.take(padding(c.pos, alignment), "padding before the data section")
    data_start = c.pos
    tensors = _place(infos, alignment, data_start, size, where)
    return GGUFHeader(version, tuple(kvs), tensors, alignment, data_start), c.buf[:data_start]


def _check_keys(kvs: Sequence[KV], where: str) -> None:
    seen: set[str] = set()
    for kv in kvs:
        if kv.key in seen:
            raise FormatError(f"{where}: metadata key {kv.key!r} appears twice")
        seen.add(kv.key)


def _alignment(kvs: Sequence[KV], where: str) -> int:
    for kv in kvs:
        if kv.key == "general.alignment":
            a = kv.value
            if kv.vtype != T_UINT32 or a == 0 or a & (a - 1):
                raise FormatError(f"{where}: general.alignment is {a!r}; expected a power of two (uint32)")
            return int(a)
    return DEFAULT_ALIGNMENT


def _place(infos: Sequence[tuple[str, str, tuple[int, ...], int]], alignment: int, data_start: int,
           size: int, where: str) -> tuple[GGUFTensor, ...]:
    """Tensors with their sizes, each where llama.cpp expects it: the next aligned offset."""
    out, names, expected = [], set(), 0
    for name, dtype, ne, offset in infos:
        if name in names:
            raise FormatError(f"{where}: tensor {name!r} appears twice")
        names.add(name)
        nbytes = tensor_nbytes(dtype, ne, f"{where}: tensor {name!r}: ")
        if offset != expected:
            what = "overlaps the previous tensor" if offset < expected else "leaves a gap"
            raise FormatError(f"{where}: tensor {name!r} has data offset {offset:,}, expected {expected:,}: "
                              f"it {what}; llama.cpp needs tensors in the order of their infos, each "
                              f"at the next multiple of {alignment}")
        if data_start + offset + nbytes > size:
            raise FormatError(f"{where}: tensor {name!r} ends at byte {data_start + offset + nbytes:,}, "
                              f"past the end of the file ({size:,} bytes); the file is truncated")
        out.append(GGUFTensor(name, dtype, ne, offset, nbytes))
        expected = offset + nbytes + padding(nbytes, alignment)
    if size > data_start + expected:
        raise FormatError(f"{where}: file is {size:,} bytes but its header describes "
                          f"{data_start + expected:,}; the file is longer than its header describes")
    return tuple(out)
