"""The tensor entries of a safetensors header: the dtypes the reference loader knows, the entry
record, and the checks of every rule an entry must follow (:func:`core.format.parse_header` uses
them). A 1 T checkpoint's headers hold 140,000 entries: those of the usual form are checked in
bulk, and any other entry is checked alone and named."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

from core.errors import FormatError

#: Dimensions, offsets and element counts are 64-bit unsigned in the reference loader.
LIMIT = 1 << 64

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


def nbytes_of(dtype: str, shape: Sequence[int]) -> int:
    """Bytes taken by a tensor of ``dtype`` and ``shape``.

    Raises:
        FormatError: unknown dtype, or a sub-byte dtype whose element count does not fill whole
            bytes.
    """
    if dtype not in DTYPE_BITS:
        raise FormatError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BITS)}")
    elements = math.prod(shape)
    if elements >= LIMIT:
        raise FormatError(f"a shape of {len(shape)} dimensions holds 2^64 elements or more, more than the format counts")
    bits = elements * DTYPE_BITS[dtype]
    if bits % 8:
        raise FormatError(f"{elements} elements of {dtype} do not fill whole bytes")
    return bits // 8


BY_OFFSETS = operator.itemgetter(3, 4)  # a TensorEntry's (start, end)


def check_contiguous(entries: list[TensorEntry], where: str) -> None:
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


def usual_entries(doc: dict[str, Any]) -> list[TensorEntry] | None:
    """The entries of a header whose every entry is a usual one (an object of exactly a known
    dtype, a shape and data offsets of non-negative ints, spanning the shape's bytes), checked in bulk:
    the types of all the numbers of a header at once, in C. ``None`` when any is not, or for no
    entries: :func:`parse_entry` then finds the first at fault and names it."""
    numbers: list[Any] = []
    add = numbers.extend
    names: list[str] = list(doc)
    dtypes: list[str] = []
    shapes: list[list[Any]] = []
    offsets_of: list[list[Any]] = []
    try:
        for info in doc.values():
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if len(info) != 3 or type(shape) is not list or type(offsets) is not list or len(offsets) != 2 or type(dtype) is not str:
                return None
            add(shape)
            add(offsets)
            dtypes.append(dtype)
            shapes.append(shape)
            offsets_of.append(offsets)
    except (KeyError, TypeError):  # an entry that is no object, or lacks a field
        return None
    if not names or not set(map(type, numbers)) <= {int} or min(numbers) < 0 or max(numbers) >= LIMIT:
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
    """Whether every value is an int (not a bool) in [0, 2^64); loops in C, since a 1 T
    checkpoint's headers hold 140,000 shapes."""
    return set(map(type, values)) <= {int} and (not values or (min(values) >= 0 and max(values) < LIMIT))


def _brief(value: Any) -> str:
    """``repr(value)``, cut to a line: a hostile header's field may be megabytes long."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_entry(name: str, info: object, where: str) -> TensorEntry:
    """One entry checked alone (a header :func:`usual_entries` did not take): the first rule it
    breaks is named."""
    if not isinstance(info, dict):
        raise FormatError(f"{where}: tensor {name!r}: entry must be an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:  # a list or object is no dtype either
        raise FormatError(
            f"{where}: tensor {name!r} has unknown dtype {_brief(dtype)}; expected one of "
            f"{', '.join(DTYPE_BITS)}"
        )
    if not isinstance(shape, list) or not _counts(shape):
        raise FormatError(
            f"{where}: tensor {name!r} has shape {_brief(shape)}; expected a list of ints in [0, 2^64)"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and _counts(offsets) and offsets[0] <= offsets[1]):
        raise FormatError(
            f"{where}: tensor {name!r} has data_offsets {_brief(offsets)}; expected [begin, end] with "
            f"0 <= begin <= end < 2^64"
        )
    try:
        expected = nbytes_of(dtype, shape)
    except FormatError as e:
        raise FormatError(f"{where}: tensor {name!r}: {e}") from None
    start, end = offsets
    if end - start != expected:
        raise FormatError(
            f"{where}: tensor {name!r} ({dtype}{_brief(shape)}) spans {end - start:,} bytes, expected "
            f"{expected:,} (elements x {DTYPE_BITS[dtype]} bits / 8)"
        )
    return TensorEntry(name, dtype, tuple(shape), start, end)
