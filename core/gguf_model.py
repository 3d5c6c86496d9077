"""A GGUF model on storage: its file (or the files of a split model) and their validated headers.

A GGUF checkpoint is named by its file (``model.gguf``, or any file of a split model
``model-00001-of-00003.gguf``), or by a folder holding exactly one such model. llama.cpp's split
tool writes every split as a complete GGUF file: the first holds all the metadata, each holds
``split.no`` (0-based), ``split.count`` and ``split.tensors.count`` (tensors in all splits).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from core.errors import CheckpointError
from core.gguf import GGUFHeader, parse_header
from core.storage import Storage

SUFFIX = ".gguf"
#: What a run writes last into a GGUF output folder: its presence means the output is complete.
INDEX_NAME = "model.gguf.index.json"
_SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFFile:
    """One file of a GGUF model: its header, the sha256 of the header's bytes, its size."""

    name: str
    header: GGUFHeader
    digest: str
    size: int


def split_name(prefix: str, index: int, count: int) -> str:
    """llama.cpp's name of split ``index`` (0-based) of ``count``."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}{SUFFIX}"


def model_files(storage: Storage) -> list[str] | None:
    """The files of the GGUF model ``storage`` names, first split first; ``None`` when it names
    no GGUF model (a safetensors checkpoint).

    Raises:
        CheckpointError: a folder with several GGUF models, or a split model with files missing.
    """
    if storage.entry is not None:
        return _split_set(storage, storage.entry)
    if not storage.isdir():
        return None
    top = [f for f in storage.list_files() if "/" not in f]
    if "model.safetensors" in top or "model.safetensors.index.json" in top:
        return None
    ggufs = [f for f in top if f.endswith(SUFFIX)]
    if not ggufs:
        return None
    models = sorted({m.group("prefix") if (m := _SPLIT_RE.match(f)) else f for f in ggufs})
    if len(models) > 1:
        raise CheckpointError(f"{storage.url} holds {len(models)} GGUF models ({', '.join(models[:4])}); "
                              f"name the file of the one to use")
    return _split_set(storage, sorted(ggufs)[0])


def _split_set(storage: Storage, name: str) -> list[str]:
    m = _SPLIT_RE.match(name)
    if m is None:
        return [name]
    count = int(m.group("count"))
    names = [split_name(m.group("prefix"), i, count) for i in range(count)]
    missing = [n for n in names if not storage.exists(n)]
    if missing:
        raise CheckpointError(f"{storage.describe(missing[0])}: split {names.index(missing[0]) + 1} of "
                              f"{count} of this GGUF model is missing ({len(missing)} missing); a split "
                              f"model needs all its files side by side")
    return names


def read_file(storage: Storage, name: str) -> GGUFFile:
    """Read and validate one GGUF file's header with ranged reads."""
    where = storage.describe(name)
    size = storage.size(name)
    header, raw = parse_header(lambda s, e: storage.read_range(name, s, e), size, where)
    return GGUFFile(name, header, hashlib.sha256(raw).hexdigest(), size)


def open_model(storage: Storage, names: Sequence[str], max_workers: int = 8) -> list[GGUFFile]:
    """Every file's header, checked to belong together as the splits of one model.

    Raises:
        CheckpointError: split metadata that disagrees with the file names or counts, a tensor
            in two splits, or splits of different models.
        FormatError: a header that breaks the GGUF rules.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(names)))) as pool:
        files = list(pool.map(lambda n: read_file(storage, n), names))
    if len(files) == 1 and files[0].header.get("split.count", 1) in (0, 1):
        return files
    total = files[0].header.get("split.tensors.count")
    arch = files[0].header.get("general.architecture")
    seen: dict[str, str] = {}
    for i, f in enumerate(files):
        where = storage.describe(f.name)
        no, count = f.header.get("split.no"), f.header.get("split.count")
        if (no, count) != (i, len(files)):
            raise CheckpointError(f"{where}: split.no {no!r} and split.count {count!r}; expected {i} and "
                                  f"{len(files)} for split {i + 1} of {len(files)} (file names and split "
                                  f"metadata disagree: are these the splits of one model?)")
        other = f.header.get("general.architecture", arch)
        if f.header.get("split.tensors.count", total) != total or other != arch:
            raise CheckpointError(f"{where}: its split metadata (architecture {other!r}, "
                                  f"{f.header.get('split.tensors.count')!r} tensors in all) differs from "
                                  f"the first split's ({arch!r}, {total!r}): splits of different models")
        for t in f.header.tensors:
            if t.name in seen:
                raise CheckpointError(f"{where}: tensor {t.name!r} is also in {seen[t.name]}: splits of "
                                      f"different models, or a damaged split")
            seen[t.name] = f.name
    if total != len(seen):
        raise CheckpointError(f"{storage.describe(files[0].name)}: split.tensors.count is {total!r}, but "
                              f"the {len(files)} splits hold {len(seen)} tensors: splits of different models")
    return files


def output_names(source: Sequence[str], count: int) -> list[str]:
    """Output file names: the source's base name, split the way llama.cpp names splits."""
    m = _SPLIT_RE.match(source[0])
    prefix = m.group("prefix") if m else posixpath.splitext(source[0])[0]
    if count == 1:
        return [prefix + SUFFIX]
    return [split_name(prefix, i, count) for i in range(count)]
