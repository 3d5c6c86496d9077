"""The safetensors file format: parse, validate and encode headers without touching tensor data.

Layout of a file: an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON
(``{name: {dtype, shape, data_offsets}}`` plus an optional ``__metadata__`` mapping of strings),
then the data buffer. ``data_offsets`` are relative to the start of the buffer.

:func:`parse_header` enforces every rule of the reference loader; :func:`encode_header` writes
the bytes the reference writer writes for the same tensors in the same order, and
:func:`reference_order` gives that order.
"""

from __future__ import annotations

import json
import math
import operator
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from core import jsonfile
from core.errors import FormatError

#: Largest header the reference loader accepts.
MAX_HEADER_BYTES = 100_000_000
#: Bytes of the little-endian header-length prefix.
PREFIX_BYTES = 8

#: Bits per element of every dtype the reference implementation knows, in the order of its
#: ``Dtype`` enum (the reference writer sorts tensors by that order, descending).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
_DTYPE_RANK = {name: rank for rank, name in enumerate(DTYPE_BITS)}


class TensorEntry(NamedTuple):
    """One tensor of a safetensors header; offsets are relative to the data buffer. (A named
    tuple: a 1 T checkpoint's headers make 140,000 of them, three times faster than a frozen
    dataclass.)"""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header.

    ``tensors`` keep the order of their data in the buffer. ``data_start`` is the absolute file
    offset of the buffer (``8 + header_len``), so tensor ``t`` lives at
    ``data_start + t.start`` .. ``data_start + t.end`` in the file.
    """

    tensors: tuple[TensorEntry, ...]
    metadata: Mapping[str, str] | None
    header_len: int

    @property
    def data_start(self) -> int:
        return PREFIX_BYTES + self.header_len

    @property
    def data_len(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_len


def nbytes_of(dtype: str, shape: Sequence[int]) -> int:
    """Bytes taken by a tensor of ``dtype`` and ``shape``.

    Raises:
        FormatError: unknown dtype, or a sub-byte dtype whose element count does not fill whole
            bytes.
    """
    if dtype not in DTYPE_BITS:
        raise FormatError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BITS)}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise FormatError(f"{math.prod(shape)} elements of {dtype} do not fill whole bytes")
    return bits // 8


def read_prefix(prefix: bytes, where: str, file_size: int | None = None) -> int:
    """Decode the 8-byte header length and check it against the loader's limits."""
    if len(prefix) < PREFIX_BYTES:
        raise FormatError(
            f"{where}: file is {len(prefix)} bytes long; a safetensors file starts with an "
            f"8-byte header length"
        )
    (n,) = struct.unpack("<Q", prefix[:PREFIX_BYTES])
    if n > MAX_HEADER_BYTES:
        raise FormatError(
            f"{where}: header length {n:,} exceeds the limit of {MAX_HEADER_BYTES:,} bytes "
            f"(corrupt or not a safetensors file)"
        )
    if file_size is not None and PREFIX_BYTES + n > file_size:
        raise FormatError(
            f"{where}: header length {n:,} runs past the end of the file ({file_size:,} bytes); "
            f"the file is truncated or corrupt"
        )
    return n


def parse_header(raw: bytes, where: str, file_size: int | None = None) -> Header:
    """Parse and validate the JSON header ``raw`` (without the 8-byte prefix).

    Args:
        raw: the header bytes, padding included.
        where: the file's name or URL, for error messages.
        file_size: the file's size; when given, the end of the last tensor must match it.

    Returns:
        The header with its tensors sorted by data offset.

    Raises:
        FormatError: naming ``where`` and the tensor at fault, with what was expected and found.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: header is not valid UTF-8 ({e})") from None
    try:
        doc = jsonfile.loads(text, bounded=False)  # a fixed shape, checked entry by entry
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: header must be a JSON object, found {type(doc).__name__}")

    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise FormatError(f"{where}: __metadata__ must map strings to strings")

    entries = _usual_entries(doc) or [_parse_entry(name, info, where) for name, info in doc.items()]
    entries.sort(key=_BY_OFFSETS)
    starts, ends = [t.start for t in entries], [t.end for t in entries]
    if starts[:1] not in ([], [0]) or starts[1:] != ends[:-1]:  # contiguous from 0, compared in C
        _check_contiguous(entries, where)
    header = Header(tuple(entries), metadata, len(raw))
    if file_size is not None and header.file_size != file_size:
        if header.file_size > file_size:
            problem = "truncated"
        else:
            problem = "longer than its header describes"
        raise FormatError(
            f"{where}: file is {file_size:,} bytes but its header describes "
            f"{header.file_size:,} bytes ({PREFIX_BYTES} + {header.header_len:,} header + "
            f"{header.data_len:,} data); the file is {problem}"
        )
    return header


_BY_OFFSETS = operator.itemgetter(3, 4)  # a TensorEntry's (start, end)


def _check_contiguous(entries: list[TensorEntry], where: str) -> None:
    """``entries`` (sorted by offset) must follow each other from 0; the first that does not
    is named."""
    expected = 0
    for t in entries:
        if t.start != expected:
            what = "overlaps the previous tensor" if t.start < expected else "leaves a hole"
            raise FormatError(
                f"{where}: tensor {t.name!r} starts at buffer offset {t.start:,}, expected "
                f"{expected:,}: it {what}; tensors must be contiguous from 0"
            )
        expected = t.end


def _usual_entries(doc: dict[str, Any]) -> list[TensorEntry] | None:
    """The entries of a header whose every entry is a usual one (an object with a known dtype,
    a shape and data offsets of non-negative ints, spanning the shape's bytes), checked in bulk:
    the types of all the numbers of a header at once, in C. ``None`` when any is not, or for no
    entries: :func:`_parse_entry` then finds the first at fault and names it."""
    numbers: list[Any] = []
    add = numbers.extend
    names: list[str] = list(doc)
    dtypes: list[str] = []
    shapes: list[list[Any]] = []
    offsets_of: list[list[Any]] = []
    try:
        for info in doc.values():
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if type(shape) is not list or type(offsets) is not list or len(offsets) != 2 or type(dtype) is not str:
                return None
            add(shape)
            add(offsets)
            dtypes.append(dtype)
            shapes.append(shape)
            offsets_of.append(offsets)
    except (KeyError, TypeError):  # an entry that is no object, or lacks a field
        return None
    if not names or not set(map(type, numbers)) <= {int} or min(numbers) < 0:
        return None
    entries = []
    bits_of, prod, new = DTYPE_BITS.get, math.prod, tuple.__new__  # the named tuple's fields, without its __new__
    for name, dtype, shape, (start, end) in zip(names, dtypes, shapes, offsets_of):
        bits = bits_of(dtype)
        n = prod(shape) * bits if bits else -1
        if n % 8 or end - start != n // 8:
            return None
        entries.append(new(TensorEntry, (name, dtype, tuple(shape), start, end)))
    return entries


def _counts(values: list[Any]) -> bool:
    """Whether every value is a non-negative int (not a bool); loops in C, since a 1 T
    checkpoint's headers hold 140,000 shapes."""
    return set(map(type, values)) <= {int} and (not values or min(values) >= 0)


def _parse_entry(name: str, info: object, where: str) -> TensorEntry:
    if type(info) is dict:  # the usual entry, accepted in one expression (140,000 in a 1 T checkpoint)
        dtype: Any = info.get("dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
        if (bits and type(shape) is list and type(offsets) is list and len(offsets) == 2 and _counts(shape)
                and _counts(offsets) and (math.prod(shape) * bits) % 8 == 0
                and offsets[1] - offsets[0] == math.prod(shape) * bits // 8):
            return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    if not isinstance(info, dict):
        raise FormatError(f"{where}: tensor {name!r}: entry must be an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:  # a list or object is no dtype either
        raise FormatError(
            f"{where}: tensor {name!r} has unknown dtype {dtype!r}; expected one of "
            f"{', '.join(DTYPE_BITS)}"
        )
    if not isinstance(shape, list) or not _counts(shape):
        raise FormatError(
            f"{where}: tensor {name!r} has shape {shape!r}; expected a list of non-negative ints"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and _counts(offsets) and offsets[0] <= offsets[1]):
        raise FormatError(
            f"{where}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with "
            f"0 <= begin <= end"
        )
    try:
        expected = nbytes_of(dtype, shape)
    except FormatError as e:
        raise FormatError(f"{where}: tensor {name!r}: {e}") from None
    start, end = offsets
    if end - start != expected:
        raise FormatError(
            f"{where}: tensor {name!r} ({dtype}{shape}) spans {end - start:,} bytes, expected "
            f"{expected:,} (elements x {DTYPE_BITS[dtype]} bits / 8)"
        )
    return TensorEntry(name, dtype, tuple(shape), start, end)


def reference_order(items: Iterable[tuple[str, str, Sequence[int]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """Order ``(name, dtype, shape)`` items as the reference writer does: dtype descending, then name."""
    return sorted(
        ((n, d, tuple(s)) for n, d, s in items), key=lambda it: (-_DTYPE_RANK[it[1]], it[0])
    )


def encode_header(
    items: Iterable[tuple[str, str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Encode the prefix and JSON header for tensors laid out in the order given.

    The data of each tensor follows the previous one without gaps. The result is the bytes the
    reference writer produces (compact JSON, ``__metadata__`` first, space padding to a multiple
    of 8) when ``items`` are in :func:`reference_order`.

    Returns:
        ``8-byte length + header`` — write the tensors' data right after it.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name, dtype, shape in items:
        if name in doc:
            raise FormatError(f"tensor {name!r} appears twice")
        n = nbytes_of(dtype, shape)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
