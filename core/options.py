"""Options declared once: a dataclass field that also says how the command line spells it.

The library reads only the field: its name, type and default, in the library's units. The CLI
generates its click option from the declaration (:class:`Flag`): the flag and its help, the unit
the flag counts in (``--buffer-mib`` sets ``buffer_bytes`` in MiB), and the kind of value, so an
option is defined in one place and every command that takes it takes it the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flag:
    """How the command line spells one option.

    Args:
        flag: the option, like ``--buffer-mib``.
        help: its help text.
        unit: the field holds the flag's value times this (1024 for a flag in KiB).
        kind: the value's type, named for the CLI: ``flag`` (on/off), ``int``, ``text``, ``json``
            (an object), ``positive``, ``seconds`` (finite, above 0), ``buffer_mib``,
            ``part_mib``.
        bounds: smallest and largest value of an ``int`` (None: unbounded).
        negate: a ``flag`` that turns the field off (``--no-zero-copy`` sets ``zero_copy`` False).
    """

    flag: str
    help: str
    unit: int = 1
    kind: str = "int"
    bounds: tuple[int | None, int | None] = (None, None)
    negate: bool = False


def option(default: Any, flag: str, help: str, **how: Any) -> Any:
    """A dataclass field with ``default`` that the command line sets with ``flag``."""
    kind = how.pop("kind", "flag" if isinstance(default, bool) else "int")
    return dataclasses.field(default=default, metadata={"flag": Flag(flag, help, kind=kind, **how)})


def flag_of(field: dataclasses.Field[Any]) -> Flag | None:
    """The command-line declaration of ``field``, or None when no command line sets it."""
    found = field.metadata.get("flag")
    return found if isinstance(found, Flag) else None
