"""The checkpoint model: every tensor's shard, dtype, shape and absolute byte range.

Opening a checkpoint reads ``config.json``, the index and each shard's header (two small range
reads per shard) and never any tensor data. Inconsistencies between index and shards are errors.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, NamedTuple

from core.checkpoint_files import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    checkpoint_files,
    load_index,
    load_json,
)
from core.errors import CheckpointError, FormatError
from core.format import PREFIX_BYTES, Header, parse_header, read_prefix
from core.gguf import GGUFHeader
from core.gguf_model import GGUFFile, model_files, open_model
from core.gguf_names import gguf_layout
from core.layouts import Layout, detect_layout
from core.storage import Storage

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blk)\.(\d+)\.")


class TensorInfo(NamedTuple):
    """A tensor and where its bytes are: ``[begin, end)`` of file ``shard`` (absolute offsets).
    (A named tuple, as :class:`core.format.TensorEntry` is.)"""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def layer(self) -> int | None:
        """The decoder layer the tensor belongs to (``model.layers.N.``, GGUF's ``blk.N.``), if any."""
        return _layer_of(self.name)


@lru_cache(maxsize=1 << 18)  # several steps ask it of each of a 1 T checkpoint's 140,000 names
def _layer_of(name: str) -> int | None:
    return int(m.group(1)) if (m := _LAYER_RE.search(name)) else None


@dataclass(frozen=True)
class ShardInfo:
    """A shard's identity: its size and the sha256 of its header bytes (prefix included)."""

    name: str
    size: int
    header_len: int
    header_sha256: str
    tensors: tuple[str, ...]

    def fingerprint(self) -> dict[str, Any]:
        return {"size": self.size, "header_len": self.header_len, "header_sha256": self.header_sha256}


def read_shard_header(storage: Storage, name: str) -> tuple[Header, str, int]:
    """Read and validate one shard's header with two range reads: the header, the sha256 of
    prefix + header bytes, and the file size."""
    return _parsed(storage, name, *_header_bytes(storage, name))


def _header_bytes(storage: Storage, name: str) -> tuple[bytes, bytes, int]:
    size = storage.size(name)
    prefix = storage.read_range(name, 0, min(PREFIX_BYTES, size))
    n = read_prefix(prefix, storage.describe(name), size)
    return prefix, storage.read_range(name, PREFIX_BYTES, PREFIX_BYTES + n), size


def _parsed(storage: Storage, name: str, prefix: bytes, raw: bytes, size: int) -> tuple[Header, str, int]:
    return parse_header(raw, storage.describe(name), size), hashlib.sha256(prefix + raw).hexdigest(), size


class Checkpoint:
    """A safetensors checkpoint (sharded with an index, or a single ``model.safetensors``), or a
    GGUF model (one file, or the splits of one).

    Use :meth:`open`. Attributes:
        storage: where it lives; its counter shows the bytes read so far.
        config: ``config.json`` (empty when absent).
        shards: shard name -> :class:`ShardInfo`, sorted by name.
        tensors: tensor name -> :class:`TensorInfo`, in the index's order.
        files: every other file of the checkpoint (tokenizer, generation config, …).
        container: ``"safetensors"`` or ``"gguf"``.
        gguf: a GGUF model's files with their headers (first split first); empty otherwise.
            ``config`` is then the first file's metadata (:meth:`GGUFHeader.config`).
    """

    def __init__(
        self,
        storage: Storage,
        config: dict[str, Any],
        shards: dict[str, ShardInfo],
        tensors: dict[str, TensorInfo],
        files: list[str],
        gguf: tuple[GGUFFile, ...] = (),
    ):
        self.storage = storage
        self.config = config
        self.shards = shards
        self.tensors = tensors
        self.files = files
        self.gguf = gguf
        self.container = "gguf" if gguf else "safetensors"
        #: What steps derive from the tensors and config (the MoE layers), kept for the next step.
        self.derived: dict[Any, Any] = {}

    @classmethod
    def open(
        cls,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        storage: Storage | None = None,
        max_workers: int = 8,
    ) -> Checkpoint:
        """Open and validate the checkpoint at ``url`` (a directory or fsspec prefix).

        Raises:
            CheckpointError: missing index/shard/config, path traversal in the index, tensors
                missing from or unlisted in their shards, a wrong ``total_size``.
            FormatError: a shard whose header breaks the safetensors rules.
        """
        storage = storage or Storage(url, storage_options)
        ggufs = model_files(storage)
        if ggufs is not None:
            return cls._open_gguf(storage, ggufs, max_workers)
        files = checkpoint_files(storage)
        config: dict[str, Any] = load_json(storage, CONFIG_NAME) if CONFIG_NAME in files else {}
        if INDEX_NAME in files:
            weight_map, total = load_index(storage)
        elif SINGLE_NAME in files:
            weight_map, total = None, None
        else:
            raise CheckpointError(
                f"{storage.url}: found neither {INDEX_NAME} nor {SINGLE_NAME}; is this a "
                f"safetensors checkpoint?"
            )
        shard_names = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        for s in shard_names:
            if s not in files:
                raise CheckpointError(
                    f"{storage.describe(INDEX_NAME)} names shard '{s}', which is not in "
                    f"{storage.url}"
                )
        # Read in threads (remote stores answer slowly), parsed here (threads contend for the GIL).
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(shard_names)))) as pool:
            read = zip(shard_names, pool.map(lambda s: _header_bytes(storage, s), shard_names))
            headers = {s: _parsed(storage, s, *got) for s, got in read}
        shards, located = _locate_tensors(storage, headers)
        tensors = located if weight_map is None else _indexed_tensors(storage, weight_map, located)
        # Each header's tensors fill its data contiguously, and every tensor is listed once.
        data_total = sum(header.data_len for header, _, _ in headers.values())
        if total is not None and total != data_total:
            raise CheckpointError(f"{storage.describe(INDEX_NAME)}: metadata.total_size is {total:,} but the "
                                  f"shards hold {data_total:,} bytes of tensor data")
        others = [f for f in files if f not in shards and f != INDEX_NAME]
        return cls(storage, config, shards, tensors, others)

    @classmethod
    def _open_gguf(cls, storage: Storage, names: list[str], max_workers: int) -> Checkpoint:
        """A GGUF model: each split's tensors at their absolute offsets; no other files."""
        files = open_model(storage, names, max_workers)
        headers = {f.name: (f.header, f.digest, f.size) for f in files}
        shards, tensors = _locate_tensors(storage, headers)
        return cls(storage, files[0].header.config(), shards, tensors, [], tuple(files))

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def total_size(self) -> int:
        """Bytes of tensor data (what the index's ``total_size`` counts)."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def model_type(self) -> str | None:
        """``config.json``'s ``model_type``; a GGUF model's llama.cpp architecture."""
        return self.config.get("general.architecture" if self.gguf else "model_type")

    @cached_property
    def layout(self) -> Layout:
        """The model family's expert layout, detected from the config and tensor names (a GGUF
        model's: from its metadata)."""
        if self.gguf:
            return gguf_layout(self.config, self.storage.describe(self.gguf[0].name))
        return detect_layout(self)

    @property
    def family(self) -> str:
        return self.layout.family

    def fingerprint(self) -> dict[str, dict[str, Any]]:
        """Per shard: size and header digest. A plan stores it to refuse a changed source."""
        return {name: s.fingerprint() for name, s in self.shards.items()}


def _locate_tensors(storage: Storage, headers: Mapping[str, tuple[Header | GGUFHeader, str, int]],
                    ) -> tuple[dict[str, ShardInfo], dict[str, TensorInfo]]:
    """Shard identities and every tensor's absolute byte range, from the shards' headers.

    A GGUF file's ``header_len`` is its data section's offset less 8, so that for both formats
    the data starts at ``8 + header_len``.
    """
    shards: dict[str, ShardInfo] = {}
    located: dict[str, TensorInfo] = {}
    count = 0
    new = tuple.__new__  # TensorInfo's fields in order, without its __new__ (140,000 of them)
    for s, (header, digest, size) in headers.items():
        base = header.data_start
        spans = _spans(header)
        shards[s] = ShardInfo(s, size, base - PREFIX_BYTES, digest, tuple([t[0] for t in spans]))
        for name, dtype, shape, start, end in spans:
            located[name] = new(TensorInfo, (name, dtype, shape, s, base + start, base + end))
        count += len(spans)
    if len(located) != count:  # a name stored twice: found again, in order, to name both places
        seen: dict[str, str] = {}
        for s, (header, _, _) in headers.items():
            for t in _spans(header):
                if t[0] in seen:
                    raise CheckpointError(f"{storage.url}: tensor {t[0]!r} is stored in both '{seen[t[0]]}' and '{s}'")
                seen[t[0]] = s
    return shards, located


def _spans(header: Header | GGUFHeader) -> Sequence[tuple[str, str, tuple[int, ...], int, int]]:
    """``(name, dtype, shape, start, end)`` of each tensor, offsets relative to the data (a
    safetensors header's entries are such tuples already)."""
    if isinstance(header, GGUFHeader):
        return [(t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes) for t in header.tensors]
    return header.tensors


def _indexed_tensors(storage: Storage, weight_map: Mapping[str, str],
                     located: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The tensors in the index's order, each where the index says; none left unlisted."""
    tensors = {}
    for name, s in weight_map.items():
        found = located.get(name)
        if found is None or found.shard != s:
            raise CheckpointError(
                f"{storage.describe(INDEX_NAME)} lists tensor {name!r} in shard '{s}', "
                f"but that shard's header has no such tensor"
            )
        tensors[name] = found
    # Every listed name was found, so when both hold as many, none is unlisted.
    unlisted = [] if len(located) == len(tensors) else [n for n in located if n not in weight_map]
    if unlisted:
        raise CheckpointError(
            f"shard '{located[unlisted[0]].shard}' holds tensor {unlisted[0]!r} "
            f"(and {len(unlisted) - 1} more) not listed in {storage.describe(INDEX_NAME)}"
        )
    return tensors


__all__ = ["Checkpoint", "ShardInfo", "TensorInfo", "FormatError", "read_shard_header"]
