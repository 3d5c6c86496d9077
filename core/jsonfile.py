"""Reading JSON input (plans, saliency files, keep lists, indexes, configs, pruning.json): one way
to read it and to turn what goes wrong into the project's error for that kind of file."""

from __future__ import annotations

import json
import os
import re
import stat
from itertools import accumulate
from typing import Any

import fsspec

from core.errors import CheckpointError, PlanError, RewriterError, SaliencyError

#: Most bytes read from one JSON input: plans, saliency files and keep lists of the largest models
#: are a few MB, so a bigger file is something else (and is not read past this).
MAX_JSON_BYTES = 256 << 20

#: Deepest nesting of arrays and objects a JSON input may have. The files this tool reads nest a
#: few levels; the parser (and any code walking a document) recurses once per level, so a hostile
#: ``[[[[...`` would otherwise end in a RecursionError instead of a refusal.
MAX_JSON_DEPTH = 64

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
#: Python refuses to convert an integer of more than 4,300 digits (its default limit).
_LONG_NUMBER = re.compile(r"\d{4301,}")
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)

# What a file read with each error class should have been, and what to do when it is not.
_EXPECTED = {
    PlanError: ("a plan", "pass a plan written by `rewriter plan SRC ... --out plan.json`"),
    SaliencyError: ("a saliency file or keep list",
                    "pass one written by `rewriter profile`/`synth-saliency`, or a keep list {\"LAYER\": [ids]}"),
    CheckpointError: ("a checkpoint file", "restore it from the original checkpoint"),
}


def read_url(url: str, error: type[RewriterError], *, missing: str = "file not found",
             folder: str | None = None, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of ``url`` (local path or fsspec URL), at most ``max_bytes`` of them.

    A local path is checked with ``os.stat`` before it is opened, so a FIFO, a device
    (``/dev/zero``) or a socket is refused without blocking on it or reading it.

    Raises:
        error: ``"URL: <missing>"`` when there is no such file; ``"URL: <folder>"`` when it is a
            folder and ``folder`` is given; when it is not a regular file, or is larger than
            ``max_bytes``.
    """
    local = url[len("file://"):] if url.startswith("file://") else (None if "://" in url else url)
    if local is not None:
        try:
            st = os.stat(local)
        except FileNotFoundError:
            raise error(f"{url}: {missing}") from None
        except OSError as e:
            raise error(f"{url}: cannot read it ({e.strerror or e})") from None
        if stat.S_ISDIR(st.st_mode) and folder is not None:
            raise error(f"{url}: {folder}") from None
        if not stat.S_ISDIR(st.st_mode):
            refuse_special(url, st.st_mode, error)
            _refuse_large(url, st.st_size, max_bytes, error)
    try:
        with fsspec.open(url, "rb") as f:
            raw = bytes(f.read(max_bytes + 1))
    except FileNotFoundError:
        raise error(f"{url}: {missing}") from None
    except IsADirectoryError:
        if folder is None:
            raise
        raise error(f"{url}: {folder}") from None
    _refuse_large(url, len(raw), max_bytes, error)
    return raw


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words (``"a FIFO"``, ``"a character device"``...)."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def refuse_special(url: str, mode: int, error: type[RewriterError]) -> None:
    """``error`` when ``mode`` is not a regular file's (a FIFO, a device, a socket)."""
    if not stat.S_ISREG(mode):
        raise error(f"{url}: is {file_kind(mode)}, not a regular file; give a JSON file")


def _refuse_large(url: str, size: int, max_bytes: int, error: type[RewriterError]) -> None:
    if size > max_bytes:
        raise error(f"{url}: larger than the {max_bytes >> 20} MiB a JSON input may be, so not one "
                    f"(plans, saliency files and keep lists are a few MB); give the right file")


def _expected(error: type[RewriterError], expect: tuple[str, str] | None) -> str:
    """``"so not WHAT; WHAT TO DO"`` for files read with ``error`` (or as ``expect`` says)."""
    what, todo = expect or next((v for cls, v in _EXPECTED.items() if issubclass(error, cls)),
                                ("the JSON file expected", "pass the right file"))
    return f"so not {what}; {todo}"


def loads(raw: bytes | str, *, bounded: bool = True) -> Any:
    """``json.loads(raw)``, refusing a document nested deeper than :data:`MAX_JSON_DEPTH`.

    ``bounded=False`` leaves that check to the caller (:func:`check_depth`), for documents whose
    usual form is known to be shallow once parsed (safetensors headers: 17 MB of them in a 1 T
    checkpoint); nesting deeper than Python's parser recurses is refused either way.

    Raises:
        json.JSONDecodeError: as ``json.loads`` does, for too deep a nesting (at the bracket
            that goes past the limit) and for an integer too long to convert, so callers handle
            all alike.
    """
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if bounded:
        check_depth(text)
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested deeper than Python's JSON parser recurses", text, _too_deep_at(text)) from None
    except ValueError:  # an integer of more digits than Python converts (sys.int_info)
        m = _LONG_NUMBER.search(text)
        digits = f"{len(m.group()):,}" if m else "too many"
        raise json.JSONDecodeError(f"a number of {digits} digits, more than any field takes", text,
                                   m.start() if m else 0) from None


def check_depth(text: str) -> None:
    """Refuse JSON ``text`` nested deeper than :data:`MAX_JSON_DEPTH` (what :func:`loads` checks).

    Raises:
        json.JSONDecodeError: at the bracket that goes past the limit.
    """
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _too_deep(text):
        raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels of arrays/objects",
                                   text, _too_deep_at(text))


def _too_deep(text: str) -> bool:
    """Whether ``text`` nests brackets (outside strings) deeper than :data:`MAX_JSON_DEPTH`."""
    # Without the escaped backslashes, then the escaped quotes (as a scan from the left pairs
    # them), quotes pair up in order, as _STRING pairs them, and splitting is 10x faster (a 1 T
    # checkpoint's headers are 17 MB of JSON; its plan holds them again, escaped).
    bare = text.replace("\\\\", "").replace('\\"', "") if "\\" in text else text
    if bare.count('"') % 2 == 0:
        outside = "".join(bare.split('"')[::2])
    else:
        outside = _STRING.sub("", text)
    brackets = _NOT_BRACKET.sub("", outside)
    # Each pass drops the innermost matched pairs, one or two levels: emptied in MAX / 2 passes,
    # the nesting is shallow enough, found by loops in C (a 1 T checkpoint's headers hold 500,000
    # brackets); else it is counted bracket by bracket.
    rest = brackets
    for _ in range(MAX_JSON_DEPTH // 2):
        if not rest:
            return False
        rest = rest.replace("[]", "").replace("{}", "")
    if not rest:
        return False
    return max(accumulate(1 if c in "[{" else -1 for c in brackets), default=0) > MAX_JSON_DEPTH


def _too_deep_at(text: str) -> int:
    depth = 0
    for m in _TOKEN.finditer(text):
        if m.group() in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return m.start()
        elif m.group() in "]}":
            depth -= 1
    return 0


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
        return loads(raw)
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
