"""Reading JSON input (plans, saliency files, keep lists, indexes): one way to read it and to
turn what goes wrong into the project's error for that kind of file."""

from __future__ import annotations

import json
from typing import Any

import fsspec

from rewriter.core.errors import RewriterError


def read_url(url: str, error: type[RewriterError], *, missing: str = "file not found",
             folder: str | None = None) -> bytes:
    """The bytes of ``url`` (local path or fsspec URL).

    Raises:
        error: ``"URL: <missing>"`` when there is no such file; ``"URL: <folder>"`` when it is a
            folder and ``folder`` is given.
    """
    try:
        with fsspec.open(url, "rb") as f:
            return bytes(f.read())
    except FileNotFoundError:
        raise error(f"{url}: {missing}") from None
    except IsADirectoryError:
        if folder is None:
            raise
        raise error(f"{url}: {folder}") from None


def parse_json(raw: bytes | str, where: str, error: type[RewriterError]) -> Any:
    """``raw`` parsed as JSON, or ``error`` saying that ``where`` is not valid JSON."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{where}: not valid JSON ({e})") from None
