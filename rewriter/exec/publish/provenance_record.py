"""What ``pruning.json`` records about an output, checked as untrusted input before ``verify`` uses it.

The file sits in the destination, where anyone who can write there can edit it. Before its
hashes say anything about the bytes, its own fields are checked: its ``format``; its
``plan_digest`` is the digest of the plan it embeds; its ``shards`` name exactly the plan's
outputs, each with the planned ``size``; each ``sha256`` (the whole shard's, each part's) is a
sha256 hex digest (either case); and a shard's ``parts`` tile it exactly, in any order in the file.
Each problem names the field.
"""

from __future__ import annotations

import re
from typing import Any

from planners.plan import PROVENANCE_NAME, Plan
from planners.tensors import OutputShard

FORMAT = "moe-rewriter-provenance"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

#: ``(start, end, label, sha256 in lowercase)`` of a byte range whose hash the file records.
Range = tuple[int, int, str, str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _digest(v: Any, field: str, problems: list[str]) -> str | None:
    if isinstance(v, str) and _HEX64.fullmatch(v):
        return v.lower()
    problems.append(f"{PROVENANCE_NAME}: {field} is {v!r}, not a sha256 (64 hex digits)")
    return None


def check_document(plan: Plan, doc: Any) -> tuple[list[str], dict[str, tuple[list[Range], list[Range]]]]:
    """Problems with the record, and each planned shard's checkable ``(whole, parts)`` hash ranges."""
    problems: list[str] = []
    doc = doc if isinstance(doc, dict) else {}
    if doc.get("format") != FORMAT:
        problems.append(f"{PROVENANCE_NAME}: format is {doc.get('format')!r}, not {FORMAT!r}")
    if doc.get("plan_digest") != plan.digest:
        problems.append(f"{PROVENANCE_NAME}: plan_digest {doc.get('plan_digest')!r} is not the digest of the plan "
                        f"it records ({plan.digest})")
    shards = doc.get("shards")
    if not isinstance(shards, dict):
        problems.append(f"{PROVENANCE_NAME}: shards is missing or not an object")
        shards = {}
    planned = {o.name for o in plan.outputs}
    for name in sorted(set(shards) - planned):
        problems.append(f"{PROVENANCE_NAME}: shards.{name} is not an output of the plan")
    ranges = {o.name: check_shard_record(o, shards.get(o.name), problems) for o in plan.outputs}
    return problems, ranges


def check_shard_record(out: OutputShard, rec: Any, problems: list[str]) -> tuple[list[Range], list[Range]]:
    """The shard's whole-shard range and its parts' ranges, each only where its record is valid."""
    key = f"shards.{out.name}"
    if not isinstance(rec, dict):
        problems.append(f"{PROVENANCE_NAME}: {key} is missing" if rec is None else
                        f"{PROVENANCE_NAME}: {key} is not an object")
        return [], []
    if not _is_int(rec.get("size")) or rec["size"] != out.size:
        problems.append(f"{PROVENANCE_NAME}: {key}.size is {rec.get('size')!r}, the plan's size is {out.size}")
    if "sha256" not in rec and "parts" not in rec:
        problems.append(f"{PROVENANCE_NAME}: {key} records no sha256 (neither sha256 nor parts); its bytes "
                        f"are checked tensor by tensor only")
    whole: list[Range] = []
    if "sha256" in rec:
        d = _digest(rec["sha256"], f"{key}.sha256", problems)
        whole = [(0, out.size, "", d)] if d else []
    parts = _parts(out, rec["parts"], key, problems) if "parts" in rec else []
    return whole, parts


def _parts(out: OutputShard, raw: Any, key: str, problems: list[str]) -> list[Range]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{PROVENANCE_NAME}: {key}.parts is not a list of parts")
        return []
    parts: list[Range] = []
    for i, p in enumerate(raw):
        field = f"{key}.parts[{i}]"
        if not isinstance(p, dict) or not _is_int(p.get("start")) or not _is_int(p.get("length")) \
                or p["start"] < 0 or p["length"] <= 0:
            problems.append(f"{PROVENANCE_NAME}: {field} needs an integer start >= 0 and length > 0")
            return []
        d = _digest(p.get("sha256"), f"{field}.sha256", problems)
        if d is None:
            return []
        start, end = p["start"], p["start"] + p["length"]
        parts.append((start, end, f"part {i} (bytes {start:,}-{end:,}) ", d))
    parts.sort()
    pos = 0
    for start, end, label, _ in parts:
        if start != pos:
            what = "overlaps the part before it" if start < pos else f"leaves bytes {pos:,}-{start:,} uncovered"
            problems.append(f"{PROVENANCE_NAME}: {key}.parts: {label.strip()} {what}; parts must tile the shard")
            return []
        pos = end
    if pos != out.size:
        problems.append(f"{PROVENANCE_NAME}: {key}.parts end at byte {pos:,}, the shard has {out.size:,}")
        return []
    return parts
