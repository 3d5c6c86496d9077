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
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from core import jsonfile
from core.entries import (  # noqa: F401 (also this module's names for its importers)
    BY_OFFSETS,
    DTYPE_BITS,
    TensorEntry,
    check_contiguous,
    nbytes_of,
    parse_entry,
    usual_entries,
)
from core.errors import FormatError

#: Largest header the reference loader accepts.
MAX_HEADER_BYTES = 100_000_000
#: Bytes of the little-endian header-length prefix.
PREFIX_BYTES = 8

_DTYPE_RANK = {name: rank for rank, name in enumerate(DTYPE_BITS)}


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
        doc = jsonfile.loads(text, bounded=False)  # bounded below, unless every entry has the usual form
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

    entries = usual_entries(doc)
    if entries is None:  # an entry of another form: nesting bounded as in any JSON read, then each entry checked
        try:
            jsonfile.check_depth(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{where}: header is not valid JSON ({e})") from None
        entries = [parse_entry(name, info, where) for name, info in doc.items()]
    entries.sort(key=BY_OFFSETS)
    starts, ends = [t.start for t in entries], [t.end for t in entries]
    if starts[:1] not in ([], [0]) or starts[1:] != ends[:-1]:  # contiguous from 0, compared in C
        check_contiguous(entries, where)
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
