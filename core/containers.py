"""Container formats: a checkpoint file is a header plus tensors at byte offsets.

Two formats implement it: safetensors (:mod:`core.format`) and GGUF
(:mod:`core.gguf`). The planner asks the source checkpoint's container for the output
files' names and headers; a plan records the container's name and each output's header, and
rebuilds the header's tensor list from the JSON to check it against the planned segments. Every
executor then writes ``header + segments`` whatever the format, so the runs, resume, dry run and
verify need nothing of their own.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from core import gguf, gguf_write
from core.checkpoint import INDEX_NAME, Checkpoint
from core.errors import FormatError
from core.format import PREFIX_BYTES, encode_header, parse_header
from core.gguf_model import INDEX_NAME as GGUF_INDEX_NAME
from core.gguf_model import output_names

#: ``(name, dtype, shape)`` of a tensor in an output file, in data order.
Item = tuple[str, str, tuple[int, ...]]
#: What a recorded header declares of each tensor: name, dtype, shape and data bytes.
Entry = tuple[str, str, tuple[int, ...], int]


class Container(Protocol):
    """One file format, as the planner and a plan's reader see it."""

    name: str
    suffix: str
    #: The file a run writes last: its presence means the output is complete.
    index_name: str

    def alignment(self, ckpt: Checkpoint) -> int:
        """Each tensor's data starts at a multiple of this (1: no padding)."""
        ...

    def output_names(self, ckpt: Checkpoint, count: int) -> list[str]: ...

    def headers(self, ckpt: Checkpoint, groups: Sequence[Sequence[Item]],
                patch: Mapping[str, Any]) -> list[bytes]:
        """Each output file's header bytes, with ``patch`` applied to the model's metadata."""
        ...

    def header_to_json(self, header: bytes) -> str: ...

    def header_from_json(self, text: str, size: int, where: str) -> tuple[bytes, list[Entry], int]:
        """The header bytes a plan records, the tensors they declare and their alignment,
        validated as a file of ``size`` bytes would be."""
        ...


class Safetensors:
    name = "safetensors"
    suffix = ".safetensors"
    index_name = INDEX_NAME

    def alignment(self, ckpt: Checkpoint) -> int:
        return 1

    def output_names(self, ckpt: Checkpoint, count: int) -> list[str]:
        # As transformers' save_pretrained names them: one shard is model.safetensors (the name
        # loaders look for first), several are numbered from 1, or from 0 like the source's.
        if count == 1:
            return ["model.safetensors"]
        if any(re.search(r"-00000-of-\d+\.safetensors$", s) for s in ckpt.shards):
            return [f"model-{i:05d}-of-{count - 1:05d}.safetensors" for i in range(count)]
        return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]

    def headers(self, ckpt: Checkpoint, groups: Sequence[Sequence[Item]],
                patch: Mapping[str, Any]) -> list[bytes]:
        return [encode_header(grp, {"format": "pt"}) for grp in groups]

    def header_to_json(self, header: bytes) -> str:
        return header[PREFIX_BYTES:].decode("utf-8")

    def header_from_json(self, text: str, size: int, where: str) -> tuple[bytes, list[Entry], int]:
        raw = text.encode("utf-8")
        header = parse_header(raw, where)
        return (struct.pack("<Q", len(raw)) + raw,
                [(e.name, e.dtype, e.shape, e.nbytes) for e in header.tensors], 1)


class GGUF:
    """llama.cpp's format. Outputs keep the source's metadata (patched) in the first file; a
    split output is named and labelled as llama.cpp's split tool does (``split.no`` and
    ``split.count`` as uint16, ``split.tensors.count`` as int32, in every file)."""

    name = "gguf"
    suffix = ".gguf"
    index_name = GGUF_INDEX_NAME

    def alignment(self, ckpt: Checkpoint) -> int:
        return ckpt.gguf[0].header.alignment

    def output_names(self, ckpt: Checkpoint, count: int) -> list[str]:
        return output_names([f.name for f in ckpt.gguf], count)

    def headers(self, ckpt: Checkpoint, groups: Sequence[Sequence[Item]],
                patch: Mapping[str, Any]) -> list[bytes]:
        first = ckpt.gguf[0].header
        n, total = len(groups), sum(len(g) for g in groups)
        out = []
        for i, grp in enumerate(groups):
            split = [gguf_write.encode_kv("split.no", gguf.T_UINT16, i), gguf_write.encode_kv("split.count", gguf.T_UINT16, n),
                     gguf_write.encode_kv("split.tensors.count", gguf.T_INT32, total)] if n > 1 else []
            kvs = gguf_write.patched_kvs(first, patch, ("split.",), split) if i == 0 else split
            out.append(gguf_write.encode_header(kvs, grp, first.alignment))
        return out

    def header_to_json(self, header: bytes) -> str:
        return base64.b64encode(header).decode("ascii")

    def header_from_json(self, text: str, size: int, where: str) -> tuple[bytes, list[Entry], int]:
        try:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise FormatError(f"{where}: header is not base64 (a GGUF output's header is recorded so)") from None

        def fetch(start: int, end: int) -> bytes:
            return raw[start:end] + bytes(max(0, min(end, size) - max(start, len(raw))))

        header, head = gguf.parse_header(fetch, size, where)
        if head != raw:
            raise FormatError(f"{where}: header holds {len(raw) - len(head):,} bytes past its end")
        return raw, [(t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors], header.alignment


CONTAINERS: dict[str, Container] = {"safetensors": Safetensors(), "gguf": GGUF()}


def container_of(ckpt: Checkpoint) -> Container:
    return CONTAINERS[ckpt.container]
