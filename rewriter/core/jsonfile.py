"""Reading JSON input (plans, saliency files, keep lists, indexes, configs, pruning.json): one way
to read it and to turn what goes wrong into the project's error for that kind of file."""

from __future__ import annotations

import json
from typing import Any

import fsspec

from rewriter.core.errors import CheckpointError, PlanError, RewriterError, SaliencyError

# What a file read with each error class should have been, and what to do when it is not.
_EXPECTED = {
    PlanError: ("a plan", "pass a plan written by `rewriter plan SRC ... --out plan.json`"),
    SaliencyError: ("a saliency file or keep list",
                    "pass one written by `rewriter profile`/`synth-saliency`, or a keep list {\"LAYER\": [ids]}"),
    CheckpointError: ("a checkpoint file", "restore it from the original checkpoint"),
}


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


def _expected(error: type[RewriterError], expect: tuple[str, str] | None) -> str:
    """``"so not WHAT; WHAT TO DO"`` for files read with ``error`` (or as ``expect`` says)."""
    what, todo = expect or next((v for cls, v in _EXPECTED.items() if issubclass(error, cls)),
                                ("the JSON file expected", "pass the right file"))
    return f"so not {what}; {todo}"


def parse_json(raw: bytes | str, where: str, error: type[RewriterError],
               expect: tuple[str, str] | None = None) -> Any:
    """``raw`` parsed as JSON (UTF-8 text), or ``error`` saying that ``where`` is not.

    ``expect`` is (what the file should be, what to do) for the message, when the file is not
    the usual one for ``error`` (a plan, a saliency file, a checkpoint's file).

    Bytes are decoded as UTF-8 only (JSON files are UTF-8, RFC 8259), so a shard or any other
    binary file is named as such instead of being guessed as UTF-16 or failing deep inside.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not UTF-8 JSON (byte 0x{e.object[e.start]:02x} at offset {e.start}), "
                        f"{_expected(error, expect)}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e}), {_expected(error, expect)}") from None


def parse_json_object(raw: bytes | str, where: str, error: type[RewriterError],
                      expect: tuple[str, str] | None = None) -> dict[str, Any]:
    """:func:`parse_json` of a document that must be a JSON object (``{...}``)."""
    doc = parse_json(raw, where, error, expect)
    if not isinstance(doc, dict):
        raise error(f"{where}: expected a JSON object ({{...}}), found a JSON "
                    f"{_json_kind(doc)}, {_expected(error, expect)}")
    return doc


def _json_kind(doc: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(doc), type(doc).__name__)
