"""How a plan names its source and its provenance where it is published (pruning.json, the model card): a local source by content, never by the machine's path."""

from __future__ import annotations

import os
import re
from typing import Any

#: The provenance file a rewrite writes beside its output.
PROVENANCE_NAME = "pruning.json"

UNSTABLE_PROVENANCE = ("created_utc",)


#: How ``pruning.json`` names a local source: ``local:<folder name>`` (or the Hugging Face cache
#: part of its path, which names the Hub repo), never the machine's path.
LOCAL_SOURCE = "local:"


_HF_CACHE_PART = re.compile(r"models--[^/]+?--[^/]+/snapshots/[^/]+/?$")


def is_local_path(url: str) -> bool:
    return "://" not in url and not url.startswith(LOCAL_SOURCE)


def published_source(url: str) -> str:
    m = _HF_CACHE_PART.search(url)
    return LOCAL_SOURCE + (m.group(0).rstrip("/") if m else url.rstrip("/").rsplit("/", 1)[-1])


def names_only(entry: Any) -> Any:
    if isinstance(entry, list):
        return [names_only(e) for e in entry]
    if isinstance(entry, dict) and isinstance(entry.get("path"), str):
        return {**entry, "path": entry["path"].rstrip("/").rsplit("/", 1)[-1]}
    return entry


def without_paths(entry: Any) -> Any:
    if isinstance(entry, list):
        return [without_paths(e) for e in entry]
    if isinstance(entry, dict):
        return {k: v for k, v in entry.items() if k != "path"}
    return entry


def source_location(storage: Any) -> str:
    """The URL a plan records for a source: local paths made absolute (so a plan, and the
    ``pruning.json`` that carries it, works from any folder and on shared storage)."""
    if storage.is_local:
        root = os.path.abspath(storage.root)
        return os.path.join(root, storage.entry) if storage.entry else root
    return str(storage.url)
