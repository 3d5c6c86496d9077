"""Where a plan's carried bytes live in files: inline in the plan (hex) or in its sidecar.

The sidecar is a safetensors file beside the plan, named in the plan (``carried-<hash>.safetensors``),
holding each carried tensor as a flat ``U8`` tensor under its output name: any safetensors reader
opens it, and it needs no dtype of its own whatever the output's container. It is untrusted input,
as the plan is: its header is bounded and checked against the plan (names, lengths), and every
tensor's sha256 against the one the plan records, before a run writes anything. Each tensor is
read once into its own bytes object, so loading holds one copy of the carried bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Mapping
from typing import IO, Any, TypeVar

import fsspec

from core.atomic import write_whole
from core.errors import FormatError, PlanError
from core.format import PREFIX_BYTES, encode_header, parse_header, read_prefix
from core.jsonfile import file_kind
from planners.carried_field import PlanLike, carried_json, carried_tensors

#: A :class:`planners.plan.Plan` (this module is below it, so it knows it by its attributes).
P = TypeVar("P", bound=PlanLike)

#: A sidecar's header names a few tensors per MoE layer; anything much bigger is not one.
MAX_SIDECAR_HEADER = 16 << 20
_FORMAT = {"format": "moe-rewriter-carried"}


def sidecar_url(plan_url: str, name: str) -> str:
    """``name`` in the folder of ``plan_url`` (a local path or an fsspec URL)."""
    if "://" in plan_url:
        return plan_url.rsplit("/", 1)[0] + "/" + name
    return os.path.join(os.path.dirname(plan_url), name)


def load_carried(plan: P, doc: Mapping[str, Any], url: str) -> P:
    """``plan`` (read from ``url``) with its carried tensors' bytes, from inline hex or the
    sidecar, each checked against its recorded sha256."""
    if plan.carried is None:
        return plan
    field = doc["carried"]
    where = url
    if "inline" in field:
        found = {name: _unhex(field["inline"][name], name, url) for name in plan.carried.tensors}
    elif "sidecar" in field:
        side = sidecar_url(url, field["sidecar"])
        found, where = read_sidecar(side, plan, url), f"{side} (the sidecar of plan {url})"
    else:
        raise PlanError(f"{url}: the plan records its carried tensors ({_names(plan)}) by sha256 only, as "
                        f"pruning.json does, not their bytes; run the plan file that `rewriter plan` or "
                        f"`rewriter recalibrate` wrote (with its sidecar, when it has one)")
    return with_bytes(plan, found, where)


def _names(plan: PlanLike) -> str:
    names = list(plan.carried.tensors) if plan.carried is not None else []
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _unhex(text: str, name: str, url: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise PlanError(f"{url}: carried tensor {name!r}: its inline bytes are not hex. Refusing this plan: "
                        f"make it again") from None


def with_bytes(plan: P, found: Mapping[str, bytes], where: str) -> P:
    """``plan`` with each carried segment holding ``found[name]``, its length and sha256 checked."""
    def filled(t: Any) -> Any:
        seg = t.segments[0]
        data = found[t.name]
        if len(data) != t.nbytes:
            raise PlanError(f"{where}: carried tensor {t.name!r} is {len(data):,} bytes; the plan's "
                            f"{t.dtype}{list(t.shape)} tensor is {t.nbytes:,}. Refusing this plan: make it again")
        if hashlib.sha256(data).hexdigest() != seg.sha256:
            raise PlanError(f"{where}: carried tensor {t.name!r} does not have the sha256 the plan records "
                            f"({seg.sha256[:12]}...): its bytes were changed. Refusing this plan: restore the "
                            f"file or make the plan again")
        return dataclasses.replace(t, segments=(dataclasses.replace(seg, data=data),))

    carried = set(plan.carried.tensors) if plan.carried is not None else set()
    outputs = tuple(
        dataclasses.replace(o, tensors=tuple(filled(t) if t.name in carried else t for t in o.tensors))
        for o in plan.outputs
    )
    return dataclasses.replace(plan, outputs=outputs)  # type: ignore[type-var]  # a Plan: a frozen dataclass


def read_sidecar(url: str, plan: PlanLike, plan_url: str) -> dict[str, bytes]:
    """Each carried tensor's bytes from the sidecar at ``url``; refuses a missing, foreign,
    truncated or damaged file, naming it and the tensor."""
    want = {t.name: t.nbytes for t in carried_tensors(plan)}
    where = f"{url} (the sidecar of plan {plan_url})"
    local = url[len("file://"):] if url.startswith("file://") else (None if "://" in url else url)
    try:
        if local is not None:  # checked before opening: opening a FIFO would block
            st = os.stat(local)
            if not stat.S_ISREG(st.st_mode):
                raise PlanError(f"{where} is {file_kind(st.st_mode)}, not a regular file; put the sidecar written "
                                f"with the plan there")
            size = st.st_size
        else:
            fs, path = fsspec.core.url_to_fs(url)
            size = int(fs.size(path))
        with fsspec.open(url, "rb") as f:
            return _read_tensors(f, size, want, where)
    except FileNotFoundError:
        raise PlanError(f"{url}: not found; plan {plan_url} keeps the bytes of its carried tensors "
                        f"({_names(plan)}) in this file beside it: copy it along with the plan") from None
    except FormatError as e:
        why = str(e).removeprefix(f"{where}: ")  # the format's message names the file too
        raise PlanError(f"{where} is not a sidecar this tool wrote ({why}); restore it or make the plan "
                        f"again") from None
    except OSError as e:
        raise PlanError(f"{where}: cannot read it ({e.strerror or e}); check the path and its permissions") from None


def _read_tensors(f: IO[bytes], size: int, want: Mapping[str, int], where: str) -> dict[str, bytes]:
    n = read_prefix(f.read(PREFIX_BYTES), where, size)
    if n > MAX_SIDECAR_HEADER:
        raise PlanError(f"{where}: header of {n:,} bytes; a sidecar's is at most {MAX_SIDECAR_HEADER:,}")
    header = parse_header(f.read(n), where)
    entries = {e.name: e for e in header.tensors}
    for name in want:
        if name not in entries:
            raise PlanError(f"{where} holds no tensor {name!r}, which the plan carries; restore the sidecar "
                            f"written with the plan")
    for name, e in entries.items():
        if name not in want:
            raise PlanError(f"{where} holds tensor {name!r}, which the plan does not carry: it is the sidecar "
                            f"of another plan; restore the one written with this plan")
        if e.dtype != "U8" or e.shape != (want[name],):
            raise PlanError(f"{where}: tensor {name!r} is {e.dtype}{list(e.shape)}; the plan carries "
                            f"{want[name]:,} bytes of it (U8[{want[name]}]): restore the sidecar written with the plan")
    out = {}
    for name in want:
        e = entries[name]
        f.seek(header.data_start + e.start)
        data = f.read(e.nbytes)
        if len(data) != e.nbytes:
            raise PlanError(f"{where} is truncated: tensor {name!r} needs bytes up to "
                            f"{header.data_start + e.end:,}, the file has {size:,}; restore it")
        out[name] = bytes(data)
    return out


def save_carried(plan: PlanLike, url: str) -> None:
    """Write the sidecar of ``plan`` beside ``url`` (where the plan is about to be saved), when
    its carried bytes are too many to hold inline; a local one under a temporary name, fsynced
    and renamed, so that a sidecar is whole or absent."""
    if plan.carried is None or "sidecar" not in carried_json(plan):
        return
    tensors = carried_tensors(plan)
    header = encode_header([(t.name, "U8", (t.nbytes,)) for t in tensors], _FORMAT)
    target = sidecar_url(url, plan.carried.sidecar_name)
    write_whole(target, lambda f: _write(f, header, tensors), binary=True)


def _write(f: IO[bytes], header: bytes, tensors: list[Any]) -> None:
    f.write(header)
    for t in tensors:
        f.write(t.segments[0].data)

