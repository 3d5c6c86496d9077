"""Option types and the rules for files the CLI writes (what may be replaced, and where)."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable
from typing import Any

import click

MiB = 1 << 20


class _JsonObject(click.ParamType):
    name = "JSON"

    def convert(self, value: Any, param: Any, ctx: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        from core.jsonfile import loads

        try:
            d = loads(value)
        except json.JSONDecodeError as e:
            self.fail(f"not JSON: {e}", param, ctx)
        if not isinstance(d, dict):
            self.fail("expected a JSON object, like '{\"key\": \"value\"}'", param, ctx)
        return d


class _Size(click.ParamType):
    """A byte size like 5GB or 500MiB, above zero."""

    name = "SIZE"
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        t = str(value).strip().upper()
        num = t.rstrip("KMGTIB")
        try:
            n = int(float(num) * self.units[t[len(num):]])
        except (KeyError, ValueError, OverflowError):
            self.fail(f"{value!r} is not a size like 5GB or 500MiB", param, ctx)
        if n < 1:
            self.fail(f"{value!r}: the size must be above 0", param, ctx)
        return n


class _FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: ``nan`` passes every comparison of a range, and
    ``inf`` one without an upper bound, so both are refused before the range is checked."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        v = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(v, param, ctx)

    def _describe_range(self) -> str:
        # click would print an unbounded range as "x<=None" in --help.
        return "" if self.min is None and self.max is None else super()._describe_range()


class _DomainName(click.ParamType):
    """A calibration domain name that is safe to write in a model card and a JSON file."""

    name = "NAME"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from planners.saliency import domain_problem

        problem = domain_problem(value)
        if problem:
            self.fail(f"{value!r} {problem}", param, ctx)
        return str(value)


def finite(min: float | None = None, max: float | None = None, min_open: bool = False) -> click.FloatRange:
    """A finite float option, optionally bounded."""
    return _FiniteFloat(min, max, min_open=min_open)


JSON_OBJECT, SIZE, DOMAIN = _JsonObject(), _Size(), _DomainName()
POSITIVE, NON_NEGATIVE = click.IntRange(min=1), click.IntRange(min=0)


def refuse_existing_file(path: str, option: str, force: bool, replaceable: Callable[[str], bool] | None = None) -> None:
    """Refuse to write ``path`` over a folder, over what is not a regular file (a FIFO, a device),
    or over a file unless ``force`` or ``replaceable``."""
    from core.jsonfile import file_kind

    if "://" in path or not os.path.lexists(path):
        return
    if os.path.isdir(path):
        raise click.BadParameter(f"{path} is a folder; give a file name", param_hint=option)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFREG  # a dangling link: written through as before
    if not stat.S_ISREG(mode):
        raise click.BadParameter(f"{path} is {file_kind(mode)}, not a regular file; give a file name",
                                 param_hint=option)
    if force or (replaceable is not None and replaceable(path)):
        return
    if os.path.islink(path) and not os.path.exists(path):
        what = f"is a symbolic link to {os.readlink(path)}, which does not exist"
    else:
        what = "is not a plan file" if replaceable is not None else "exists"
    raise click.BadParameter(
        f"{path} {what}; refusing to overwrite it: choose another name"
        + ("" if replaceable is not None else " or pass --force to replace it"),
        param_hint=option,
    )


def _is_plan_file(path: str) -> bool:
    from core.errors import PlanError
    from core.jsonfile import parse_json, read_url
    from planners.plan import PLAN_FORMAT

    # A plan this project wrote names its format first: the first bytes tell, with no need to
    # parse tens of MB (a 1 T model's plan). Anything else is parsed whole to be sure. Plans of
    # the largest models are tens of MB; a bigger file, or what is not a regular file, is
    # something else, left unread (read_url reads no further than its cap, never a FIFO).
    try:
        with open(path, "rb") as f:  # a regular local file: refuse_existing_file checked
            head = rb'\s*\{\s*"format"\s*:\s*' + re.escape(json.dumps(PLAN_FORMAT).encode()) + rb"\s*,"
            if re.match(head, f.read(4096)):
                return True
    except OSError:
        return False
    try:
        doc = parse_json(read_url(path, PlanError, max_bytes=64 * MiB), path, PlanError)
    except (OSError, PlanError):
        return False
    return isinstance(doc, dict) and doc.get("format") == PLAN_FORMAT


def save_plan(p: Any, out: str, option: str) -> None:
    """Write a plan; a file already at ``out`` is replaced only when it is a plan."""
    refuse_plan_out(out, option)
    _write_out(p.save, out, option)


def refuse_plan_out(out: str, option: str) -> None:
    """What :func:`save_plan` would refuse at ``out``: checked before long work, not after it."""
    refuse_existing_file(out, option, force=False, replaceable=_is_plan_file)
    refuse_missing_folder(out, option)


def save_saliency(sal: Any, out: str, force: bool) -> None:
    refuse_existing_file(out, "--out", force)
    _write_out(sal.save, out, "--out")


def refuse_missing_folder(out: str, option: str) -> None:
    """Refuse a local ``out`` whose folder does not exist (checked before long work, not after)."""
    folder = os.path.dirname(os.path.abspath(out))
    if "://" not in out and not os.path.isdir(folder):
        raise click.BadParameter(f"cannot write {out}: {folder} is not an existing folder; create it first",
                                 param_hint=option)


def _write_out(save: Callable[[str], None], out: str, option: str) -> None:
    refuse_missing_folder(out, option)
    try:
        save(out)
    except OSError as e:
        raise click.BadParameter(f"cannot write {out}: {e.strerror or e}; choose a writable place",
                                 param_hint=option) from None


#: Largest --buffer-mib: far past where copies get faster, and every worker allocates one.
MAX_BUFFER_MIB = 1024
#: Bounds of the estimate's bandwidths (MB/s) and latency (ms): past them it says nothing useful.
MIN_MBPS, MAX_MBPS, MAX_LATENCY_MS = 0.001, 1e7, 60000.0


class _BufferMiB(click.ParamType):
    name = "MIB"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        n: int = click.INT.convert(value, param, ctx)
        if n < 1:
            self.fail(f"{n} is not a positive number of MiB; give 1-{MAX_BUFFER_MIB} (16-256 is usual)", param, ctx)
        if n > MAX_BUFFER_MIB:
            self.fail(f"{n} MiB is more than the {MAX_BUFFER_MIB} MiB allowed: each worker allocates this much "
                      f"and copies are no faster past a few tens of MiB; give 1-{MAX_BUFFER_MIB} (16-256 is usual)", param, ctx)
        return n


BUFFER_MIB = _BufferMiB()


class _PartMiB(click.ParamType):
    """--part-mib: the multipart-upload pieces are min(part, 64 MiB), at least 5 MiB, and a part
    is a whole number of them."""

    name = "MIB"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        n: int = click.INT.convert(value, param, ctx)
        if n < 5 or (n > 64 and n % 64):
            self.fail(f"{n} MiB is not a part size: give 5 to 64, or a multiple of 64 (128, 192, 256, ...)",
                      param, ctx)
        return n


class _LinkMbps(click.FloatRange):
    """--link-mbps: 0 (no cap) or a bandwidth in MIN_MBPS..MAX_MBPS."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        v = finite(0, MAX_MBPS).convert(value, param, ctx)
        if 0 < v < MIN_MBPS:
            self.fail(f"{value!r} MB/s is below {MIN_MBPS}: give 0 (no cap) or {MIN_MBPS}-{MAX_MBPS:g}", param, ctx)
        return v


PART_MIB, LINK_MBPS = _PartMiB(), _LinkMbps(0, MAX_MBPS)


def options_group(*opts: Callable[..., Any]) -> Callable[..., Any]:
    """One decorator applying several click options, in the order listed."""

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply
def per_layer_plan_note(plan_file: str) -> str:
    """Why ``run`` refuses a per-layer plan, and the commands that take it."""
    return (f"{plan_file} is a per-layer plan (written by `rewriter plan ... --layers`), which probes layers "
            f"but is no whole checkpoint: probe them with `rewriter dry-run {plan_file}`, or write a plan "
            f"without --layers to run")
