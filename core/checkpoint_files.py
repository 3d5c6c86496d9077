"""The files of a safetensors checkpoint folder that say what it holds: the listing, the index
(``model.safetensors.index.json``, untrusted: every shard name checked) and ``config.json``, each
refused naming the file when it is not what it must be."""

from __future__ import annotations

import posixpath
from typing import Any

from core.errors import CheckpointError
from core.jsonfile import parse_json_object
from core.names import check_shard_name
from core.storage import Storage

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def checkpoint_files(storage: Storage) -> list[str]:
    """The files of the checkpoint folder; a clear error for a file, a Hub cache or nothing."""
    files = storage.list_files() if storage.isdir() else []
    if INDEX_NAME not in files and SINGLE_NAME not in files:
        mixup = _usual_mixup(storage)
        if mixup:
            raise CheckpointError(mixup)
    if not files:
        raise CheckpointError(f"{storage.url}: no such checkpoint directory, or it is empty")
    return files


def _usual_mixup(storage: Storage) -> str | None:
    """What to pass instead, when ``storage`` is a file or a Hugging Face cache folder."""
    root = storage.root
    if storage.isfile():
        folder = posixpath.dirname(root.rstrip("/")) or "."
        what = (f"{storage.url} is a file; a checkpoint is the folder holding config.json, the "
                f"index and the shards")
        # Only a folder that is a checkpoint is worth suggesting (a shard's, not a plan's).
        if storage.exists_beside(CONFIG_NAME):
            return f"{what}: pass {folder}"
        return f"{what}; pass such a folder"
    if posixpath.basename(root.rstrip("/")).startswith("models--") and storage.isdir("snapshots"):
        revs = sorted(storage.listdir("snapshots"))
        return (f"{storage.url} is a Hugging Face cache folder; pass one of its snapshots: "
                f"{storage.url.rstrip('/')}/snapshots/<revision> (found: {', '.join(revs) or 'none'})")
    return None


def load_json(storage: Storage, name: str) -> dict[str, Any]:
    """``config.json`` or the index: JSON objects, refused naming the file when they are not."""
    return parse_json_object(storage.read_all(name), storage.describe(name), CheckpointError)


def load_index(storage: Storage) -> tuple[dict[str, str], int | None]:
    where = storage.describe(INDEX_NAME)
    doc = load_json(storage, INDEX_NAME)
    wm = doc.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{where}: expected a non-empty 'weight_map' object")
    checked = {s: check_shard_name(s, where) for s in dict.fromkeys(v for v in wm.values() if isinstance(v, str))}
    if set(map(type, wm.values())) == {str} and all(checked[s] == s for s in checked):
        weight_map: dict[str, str] = wm  # every shard named as it is (the usual index): no copy
    else:
        weight_map = {name: checked[s] if isinstance(s, str) else check_shard_name(s, where) for name, s in wm.items()}
    total = None
    meta = doc.get("metadata")
    if isinstance(meta, dict) and "total_size" in meta:
        total = meta["total_size"]
        if not isinstance(total, int) or isinstance(total, bool):
            try:
                total = int(total)
            except (TypeError, ValueError):
                raise CheckpointError(f"{where}: metadata.total_size {total!r} is not an integer") from None
    return weight_map, total
