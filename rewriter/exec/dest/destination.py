"""Opening a destination: the implementation for a URL.

* :class:`~rewriter.exec.dest.local.LocalDestination` for a local (or shared) folder;
* :class:`~rewriter.exec.dest.objects.S3Destination` for ``s3://``, with multipart uploads;
* :class:`~rewriter.exec.dest.objects.ObjectDestination` for other object stores.

The interface they implement is :mod:`rewriter.exec.dest.base`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.errors import ExecutionError
from core.storage import Storage
from rewriter.exec.dest.base import Destination
from rewriter.exec.dest.local import LocalDestination
from rewriter.exec.dest.objects import ObjectDestination, S3Destination


def open_destination(url: str, options: Mapping[str, Any] | None = None) -> Destination:
    """The destination at ``url`` (a local path or fsspec URL) with fsspec ``options``."""
    storage = Storage(url, options)
    if storage.entry is not None:  # a .gguf file name: the pruned GGUF model is written into a folder
        raise ExecutionError(f"{url}: the destination is a folder; give a folder name, not a .gguf file name")
    if storage.is_local:
        return LocalDestination(storage)
    if "s3" in storage.protocols:
        return S3Destination(storage)
    return ObjectDestination(storage)
