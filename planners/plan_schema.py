"""Type checks of a plan read from JSON, before any of it is used.

Plans are untrusted input: they travel between machines and users and are edited by hand. Each
field is checked for its type and range here, so that a bad one is one clear error naming the
plan file and the field, never a crash deep inside a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from core.errors import PlanError
from core.layouts import LAYOUTS
from core.names import hub_name_problem, relative_name_problem

_REMAKE = "make the plan again with `rewriter plan` (or restore the field)"
_MODES = ("structural", "soft")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _layer_key(k: Any) -> bool:
    return isinstance(k, str) and k.isascii() and k.isdigit()


class _Doc:
    """Reads fields of one plan document, refusing missing or mistyped ones by name."""

    def __init__(self, doc: Mapping[str, Any], where: str):
        self.doc, self.where = doc, where

    def fail(self, field: str, expected: str, found: Any) -> PlanError:
        shown = repr(found)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return PlanError(f"{self.where}: plan field {field!r} is {shown}; expected {expected}. "
                         f"Refusing this plan: {_REMAKE}")

    def get(self, obj: Mapping[str, Any], key: str, field: str, expected: str, ok: Any,
            default: Any = ..., ) -> Any:
        if key not in obj:
            if default is not ...:
                return default
            raise PlanError(f"{self.where}: the plan has no {field!r} field ({expected}). "
                            f"Refusing this plan: {_REMAKE}")
        v = obj[key]
        if not ok(v):
            raise self.fail(field, expected, v)
        return v


def check_document(doc: Mapping[str, Any], where: str) -> None:
    """Refuse a plan document whose fields are missing or of the wrong type or range.

    Consistency between fields (headers and segments, the expert mapping and the tensors) is
    checked once the plan is built (:func:`planners.plan_check.check_plan`, :func:`planners.source_check.check_source`).
    """
    d = _Doc(doc, where)
    source = d.get(doc, "source", "source", "an object with \"url\" and \"shards\"",
                   lambda v: isinstance(v, dict))
    url = d.get(source, "url", "source.url", "the source checkpoint's absolute path or URL (or local:NAME "
                "in pruning.json)",
                lambda v: isinstance(v, str) and v.strip() != "")
    if "://" not in url and not os.path.isabs(url) and not url.startswith("local:"):
        raise d.fail("source.url", "an absolute path or a URL (plans record where their source is, "
                     "so they run from any folder)", url)
    d.get(source, "shards", "source.shards", "an object of shard name -> fingerprint",
          lambda v: isinstance(v, dict) and all(isinstance(fp, dict) for fp in v.values()))
    families = sorted(layout.family for layout in LAYOUTS)
    d.get(doc, "family", "family", f"one of {families}", lambda v: v in families)
    for key in ("config", "config_patch"):
        d.get(doc, key, key, "a JSON object", lambda v: isinstance(v, dict))
    d.get(doc, "provenance", "provenance", "a JSON object", lambda v: isinstance(v, dict), {})
    d.get(doc, "mode", "mode", f"one of {list(_MODES)}", lambda v: v in _MODES, "structural")
    d.get(doc, "top_k", "top_k", "a positive integer", lambda v: _int(v) and v > 0)
    d.get(doc, "loadable_by_transformers", "loadable_by_transformers", "true or false",
          lambda v: isinstance(v, bool), True)
    d.get(doc, "layers_only", "layers_only", "null or a list of layer numbers",
          lambda v: v is None or (isinstance(v, list) and all(_int(x) and x >= 0 for x in v)), None)
    for key in ("copy_files", "skipped_files"):
        d.get(doc, key, key, "a list of file names",
              lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), [])
    _check_copy_digests(d)
    _check_mapping(d)
    _check_reasons(d)
    _check_outputs(d)


def _check_copy_digests(d: _Doc) -> None:
    digests = d.get(d.doc, "copy_file_digests", "copy_file_digests",
                    "an object of copied file -> {\"size\", \"sha256\"}", lambda v: isinstance(v, dict))
    names = d.doc.get("copy_files", [])
    if sorted(digests) != sorted(names):
        raise d.fail("copy_file_digests", f"one entry for each of copy_files {sorted(names)[:5]}", sorted(digests))
    for name, fp in digests.items():
        ok = (isinstance(fp, dict) and sorted(fp) == ["sha256", "size"] and _int(fp["size"]) and fp["size"] >= 0
              and isinstance(fp["sha256"], str) and len(fp["sha256"]) == 64
              and all(c in "0123456789abcdef" for c in fp["sha256"]))
        if not ok:
            raise d.fail(f"copy_file_digests[{name!r}]", "{\"size\": bytes, \"sha256\": 64 hex digits}", fp)


def _check_mapping(d: _Doc) -> None:
    mapping = d.get(d.doc, "expert_mapping", "expert_mapping",
                    "an object of layer -> kept original expert ids", lambda v: isinstance(v, dict))
    if not mapping:
        raise d.fail("expert_mapping", "at least one MoE layer", mapping)
    for layer, ids in mapping.items():
        if not _layer_key(layer):
            raise d.fail(f"expert_mapping[{layer!r}]", "a layer number as the key", layer)
        ok = (isinstance(ids, list) and ids and all(_int(e) and e >= 0 for e in ids)
              and all(a < b for a, b in zip(ids, ids[1:])))
        if not ok:
            raise d.fail(f"expert_mapping[{layer!r}]", "a non-empty, increasing list of distinct "
                         "original expert ids (non-negative integers)", ids)


def _check_reasons(d: _Doc) -> None:
    reasons = d.get(d.doc, "keep_reasons", "keep_reasons", "an object of layer -> expert -> reasons",
                    lambda v: isinstance(v, dict), {})
    for layer, rs in reasons.items():
        field = f"keep_reasons[{layer!r}]"
        if not _layer_key(layer) or not isinstance(rs, dict):
            raise d.fail(field, "a layer number mapped to an object of expert -> reasons", rs)
        for e, r in rs.items():
            if not _layer_key(e) or not isinstance(r, list) or not all(isinstance(x, str) for x in r):
                raise d.fail(f"{field}[{e!r}]", "an expert number mapped to a list of strings", r)


def _check_outputs(d: _Doc) -> None:
    outputs = d.get(d.doc, "outputs", "outputs", "a non-empty list of output shards",
                    lambda v: isinstance(v, list) and len(v) > 0)
    for i, o in enumerate(outputs):
        if not isinstance(o, dict):
            raise d.fail(f"outputs[{i}]", "an object with name, size, header and tensors", o)
        d.get(o, "name", f"outputs[{i}].name", "a file name", lambda v: isinstance(v, str))
        d.get(o, "header", f"outputs[{i}].header", "the shard's header as a string (JSON; base64 for GGUF)",
              lambda v: isinstance(v, str))
        d.get(o, "size", f"outputs[{i}].size", "a byte count", lambda v: _int(v) and v >= 0)
        tensors = d.get(o, "tensors", f"outputs[{i}].tensors", "a list of tensors",
                        lambda v: isinstance(v, list))
        for j, t in enumerate(tensors):
            if not _plain_tensor(t):
                _check_tensor(d, t, f"outputs[{i}].tensors[{j}]")


def _plain_tensor(t: Any) -> bool:
    """What :func:`_check_tensor` accepts, in its usual form (source segments only), checked in one
    expression: a 1 T plan holds 140,000 tensors. False sends ``t`` to the check naming the field."""
    if type(t) is not dict:
        return False
    g = t.get
    layer, shape, segments, pad = g("layer"), g("shape"), g("segments"), g("pad", 0)
    return (type(g("name")) is str and type(g("source")) is str and type(g("dtype")) is str
            and (layer is None or (type(layer) is int and layer >= 0))
            and type(shape) is list and set(map(type, shape)) <= {int} and (not shape or min(shape) >= 0)
            and type(segments) is list and set(map(type, segments)) <= {list}
            and type(pad) is int and 0 <= pad < 1 << 16)


def _check_tensor(d: _Doc, t: Any, field: str) -> None:
    if not isinstance(t, dict):
        raise d.fail(field, "an object with name, source, layer, dtype, shape and segments", t)
    for key in ("name", "source", "dtype"):
        d.get(t, key, f"{field}.{key}", "a string", lambda v: isinstance(v, str))
    d.get(t, "layer", f"{field}.layer", "null or a layer number", lambda v: v is None or (_int(v) and v >= 0),
          None)
    d.get(t, "shape", f"{field}.shape", "a list of non-negative integers",
          lambda v: isinstance(v, list) and all(_int(x) and x >= 0 for x in v))
    d.get(t, "segments", f"{field}.segments", "a list of [shard, offset, length] segments (or one "
          "{\"carried\": sha256, \"length\": bytes})",
          lambda v: isinstance(v, list) and all(isinstance(s, list) or _carried_segment(s) for s in v))
    d.get(t, "pad", f"{field}.pad", "a count of zero bytes after the tensor (GGUF alignment)",
          lambda v: _int(v) and 0 <= v < 1 << 16, 0)


def _carried_segment(s: Any) -> bool:
    return (isinstance(s, dict) and sorted(s) == ["carried", "length"] and _int(s["length"]) and s["length"] >= 0
            and isinstance(s["carried"], str) and len(s["carried"]) == 64
            and all(c in "0123456789abcdef" for c in s["carried"]))


def is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_name(name: Any, what: str, where: str) -> None:
    problem = relative_name_problem(name)
    if problem is None and "\\" in name:
        problem = "has a backslash"
    if problem:
        raise PlanError(f"{where}: {what} {name!r} {problem}; names in a plan must be relative "
                        f"'/'-separated paths without '..' components. Refusing this plan: make it again")


def check_written_name(name: str, field: str, where: str) -> None:
    """A name that becomes a file of the output: only what Hugging Face repositories use."""
    problem = hub_name_problem(name)
    if problem:
        raise PlanError(f"{where}: {field} {name!r} {problem}; names of output files may hold only "
                        f"ASCII letters, digits, '-', '_', '.' and '/' between folders, with no "
                        f"component empty or starting with '.'. Refusing this plan: make it again")



def plan_chunks(doc: Mapping[str, Any], outputs_text: Sequence[str] | None = None) -> Iterator[str]:
    """A plan document as JSON text, in pieces: one line per top-level field and per output
    shard, each written compactly. json's C encoder writes only compact JSON; an indented plan of
    a 1 T checkpoint (100,000+ tensors) took seconds in the pure-Python one. ``outputs_text``:
    the outputs already encoded, one string each."""
    def compact(v: Any) -> str:
        return json.dumps(v, separators=(",", ":"))

    yield "{"
    for i, (key, value) in enumerate(doc.items()):
        yield ("," if i else "") + f"\n{compact(key)}: "
        if key == "outputs" and (outputs_text is not None or isinstance(value, list) and value):
            yield "["
            texts = outputs_text if outputs_text is not None else [compact(o) for o in value]
            for j, o in enumerate(texts):
                yield ("," if j else "") + "\n" + o
            yield "\n]"
        else:
            yield compact(value)
    yield "\n}\n"
