"""The names a checkpoint's files may have: relative paths of the characters Hugging Face repositories use, each refusal naming the character and the field."""

from __future__ import annotations

import posixpath
import re
import unicodedata

from core.errors import CheckpointError


def relative_name_problem(name: object, strict: bool = True) -> str | None:
    """What makes ``name`` unsafe as a file name inside a folder, or None when it is safe.

    Safe: a non-empty string, relative (no leading ``/`` or ``\\``, no drive letter), no ``..``
    component whichever separator is used, no NUL byte; ``strict`` also refuses empty and ``.``
    components (index files written by other tools may hold ``./x``, which normalizes safely).
    """
    if not isinstance(name, str) or not name:
        return "is empty or not a string"
    if "\0" in name:
        return "holds a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is absolute"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "has a '..' component"
    if strict and any(p in ("", ".") for p in parts):
        return "has an empty or '.' component"
    return None


def char_label(ch: str) -> str:
    """A character as users can read it whatever their terminal does with it: ``U+202E``."""
    code = f"U+{ord(ch):04X}"
    return f"{ch!r} ({code})" if ch.isprintable() and not ch.isspace() else code


def hub_name_problem(name: str) -> str | None:
    """What makes ``name`` unlike the file names of a Hugging Face repository, or None.

    Allowed: ASCII letters, digits, ``-``, ``_``, ``.``, and ``/`` between folders; no component
    empty or starting with ``.`` (a hidden file, ``.``, ``..``). So no name can hide itself, move
    the cursor, or read backwards (U+202E) in a terminal or a file browser.
    """
    for ch in name:
        if not (ch.isascii() and (ch.isalnum() or ch in "-_./")):
            return f"holds the character {char_label(ch)}"
    for part in name.split("/"):
        if not part:
            return "has an empty component"
        if part.startswith("."):
            return f"has a component starting with '.' ({part!r})"
    return None


def _unreadable_char(name: str) -> str | None:
    """The first control, format (bidi override) or line/paragraph separator character."""
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            return char_label(ch)
    return None


def check_shard_name(name: object, where: str) -> str:
    """Reject shard names that could escape the checkpoint directory."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"Invalid shard filename {name!r} in index file '{where}': each weight_map "
                              f"value must be a shard file name (a non-empty string); fix or rewrite the index")
    if relative_name_problem(name, strict=False):
        raise CheckpointError(
            f"Invalid shard filename '{name}' in index file '{where}'. Shard filenames must be "
            f"relative paths without '..' components."
        )
    bad = _unreadable_char(name)
    if bad:
        raise CheckpointError(f"Invalid shard filename {name!r} in index file '{where}': it holds the "
                              f"character {bad}, which terminals and file browsers misread; rename the "
                              f"shard and its index entry")
    return posixpath.normpath(name.replace("\\", "/"))


def after_layer(name: str) -> tuple[int, str] | None:
    """``(N, what follows)`` for a name with exactly one ``layers.N.`` (at its start or after a
    dot; ``N`` decimal digits, as the patterns' ``\\d+``); ``None`` for any other name."""
    i = name.find("layers.")
    if i < 0 or (i and name[i - 1] != ".") or name.find("layers.", i + 1) >= 0:
        return None
    j = name.find(".", i + 7)
    digits = name[i + 7 : j]
    if j < 0 or not digits.isdecimal():
        return None
    return int(digits), name[j + 1 :]
