"""The click options of a run, generated from :class:`~rewriter.exec.options.RunOptions`.

Each option is defined once, by its field (and the :class:`core.options.Flag` it carries):
``run``, ``prune`` and ``soft-prune`` take :data:`run_options`, ``submit`` and ``python -m
ray_jobs.rewrite`` take ``run``'s, and :func:`options_from` turns what a command was given into
the one ``RunOptions`` its run is handed. Values stay in the flag's units on the command line
(what ``submit`` forwards), and are converted to the library's once, here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import click

from core.options import Flag, flag_of
from rewriter.cli.params import BUFFER_MIB, JSON_OBJECT, PART_MIB, POSITIVE, finite, options_group
from rewriter.exec.options import RunOptions

#: The click type of each kind of value a Flag names (``int`` is a click.IntRange of its bounds).
KINDS: dict[str, Any] = {"text": None, "json": JSON_OBJECT, "positive": POSITIVE,
                         "seconds": finite(0, 86400, min_open=True), "buffer_mib": BUFFER_MIB, "part_mib": PART_MIB}


def declared(cls: type = RunOptions) -> Iterator[tuple[str, Any, Flag, tuple[str, ...]]]:
    """``(name, default, flag, path)`` of every field of ``cls`` a command line sets, in order;
    fields that are dataclasses themselves (``io``) are walked in place; ``path`` leads to them."""
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            for name, d, inner, path in declared(type(default)):
                yield name, d, inner, (f.name, *path)
        elif (flag := flag_of(f)) is not None:
            yield f.name, default, flag, ()


def _click_option(name: str, default: Any, flag: Flag) -> Callable[..., Any]:
    if flag.kind == "flag":
        return click.option(flag.flag, name, is_flag=True, help=flag.help)
    shown = default if default is None or isinstance(default, str) else _in_flag_units(default, flag)
    kind = click.IntRange(*flag.bounds) if flag.kind == "int" else KINDS[flag.kind]
    return click.option(flag.flag, name, type=kind, default=shown, show_default=shown is not None, help=flag.help)


def _in_flag_units(value: Any, flag: Flag) -> Any:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # shown as its help has always shown it: "30", not "30.0"
    return value // flag.unit if flag.unit > 1 else value


#: The options of every command that runs a plan, in the order of RunOptions' fields.
run_options = options_group(*(_click_option(name, default, flag) for name, default, flag, _ in declared()))


def options_from(values: dict[str, Any], **fixed: Any) -> RunOptions:
    """The RunOptions of a command given ``values`` (its click values; those of the run options
    are taken out), with ``fixed`` fields set by the command itself (``src_options``, ...)."""
    top: dict[str, Any] = dict(fixed)
    nested: dict[str, dict[str, Any]] = {}
    for name, _, flag, path in declared():
        value = values.pop(name)
        if flag.negate:
            value = not value
        elif value is not None and flag.unit > 1:
            value *= flag.unit
        (nested.setdefault(path[0], {}) if path else top)[name] = value
    defaults = RunOptions()
    for field_name, changes in nested.items():
        top[field_name] = dataclasses.replace(getattr(defaults, field_name), **changes)
    return RunOptions(**top)
