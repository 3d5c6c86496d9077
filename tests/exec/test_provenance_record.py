"""`verify` treats `pruning.json` as untrusted input: each edit of its record is a problem naming
the field, and a valid record (parts in any order, hashes in either case) passes."""

from __future__ import annotations

import hashlib
import json

import pytest

from planners.plan import Plan
from rewriter.exec.publish.verify import verify
from rewriter.exec.run.executor import execute
from tests.conftest import cli


@pytest.fixture
def written(tiny, tiny_saliency, tmp_path):
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-n", "4", "--out", tmp_path / "p.json")
    plan = Plan.load(str(tmp_path / "p.json"))
    dst = tmp_path / "dst"
    execute(plan, str(dst))
    assert verify(plan.source_url, str(dst)).ok
    return plan, dst, json.loads((dst / "pruning.json").read_text())


def _problems(plan, dst, doc):
    (dst / "pruning.json").write_text(json.dumps(doc))
    report = verify(plan.source_url, str(dst))  # pruning.json names a local source by content only
    assert not report.mismatches  # the bytes are right; the record is not
    return report.problems


def test_each_edit_of_the_record_is_a_problem_naming_its_field(written):
    plan, dst, doc = written
    name = plan.outputs[-1].name
    edits = [
        (("plan_digest",), "0" * 64, "plan_digest"),
        (("format",), "x", "format is 'x'"),
        (("shards", "extra.safetensors"), {"size": 1, "sha256": "0" * 64}, "shards.extra.safetensors is not an output"),
        (("shards", name, "size"), 5, f"shards.{name}.size is 5"),
        (("shards", name, "size"), -1, f"shards.{name}.size is -1"),
        (("shards", name, "size"), "big", f"shards.{name}.size is 'big'"),
        (("shards", name, "sha256"), "xyz", f"shards.{name}.sha256 is 'xyz'"),
    ]
    for path, value, expect in edits:
        edited = json.loads(json.dumps(doc))
        target = edited
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
        problems = _problems(plan, dst, edited)
        assert len(problems) == 1 and expect in problems[0], (path, problems)
    edited = json.loads(json.dumps(doc))
    del edited["shards"][name]
    assert [p for p in _problems(plan, dst, edited) if f"shards.{name} is missing" in p]


def test_parts_beside_a_right_shard_hash_are_checked_too(written):
    plan, dst, doc = written
    out = plan.outputs[-1]
    data = (dst / out.name).read_bytes()
    half = out.size // 2
    doc["shards"][out.name]["parts"] = [{"start": 0, "length": half, "sha256": "1" * 64},
                                        {"start": half, "length": out.size - half, "sha256": "2" * 64}]
    problems = _problems(plan, dst, doc)
    assert len(problems) == 2 and all("part " in p and "differs" in p for p in problems)
    parts = [{"start": half, "length": out.size - half, "sha256": hashlib.sha256(data[half:]).hexdigest().upper()},
             {"start": 0, "length": half, "sha256": hashlib.sha256(data[:half]).hexdigest()}]
    doc["shards"][out.name]["parts"] = parts  # reversed order, one hash in upper case: valid
    doc["shards"][out.name]["sha256"] = doc["shards"][out.name]["sha256"].upper()
    assert _problems(plan, dst, doc) == []
    doc["shards"][out.name]["parts"] = parts + [parts[0]]
    assert [p for p in _problems(plan, dst, doc) if f"shards.{out.name}.parts" in p and "overlaps" in p]
    doc["shards"][out.name]["parts"] = parts[:1]
    assert [p for p in _problems(plan, dst, doc) if f"bytes 0-{half:,} uncovered" in p]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_parts_record_edits(ray_cluster, tiny, tiny_saliency, tmp_path):
    from rewriter.exec.distributed.ray_executor import execute_on_ray
    from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint

    write_checkpoint(tmp_path / "src", PRESETS["small"])
    synthetic_saliency(4, 32, 4, seed=3).save(tmp_path / "s.json")
    cli("plan", tmp_path / "src", "--saliency", tmp_path / "s.json", "--keep-frac", "0.5", "--max-shard-size",
        "12MB", "--out", tmp_path / "plan.json")
    plan = Plan.load(str(tmp_path / "plan.json"))
    dst = tmp_path / "parts"
    execute_on_ray(plan, str(dst), workers=2, part_bytes=5 << 20)
    doc = json.loads((dst / "pruning.json").read_text())
    name = next(n for n, r in doc["shards"].items() if len(r.get("parts", [])) > 1)
    parts = doc["shards"][name]["parts"]
    assert verify(plan.source_url, str(dst)).ok
    doc["shards"][name]["parts"] = parts[::-1]
    assert _problems(plan, dst, doc) == []
    doc["shards"][name]["parts"] = parts + [parts[-1]]
    problems = _problems(plan, dst, doc)
    assert len(problems) == 1 and f"shards.{name}.parts" in problems[0] and "overlaps" in problems[0]
    doc["shards"][name]["parts"] = [dict(p, sha256=p["sha256"].upper()) for p in parts]
    assert _problems(plan, dst, doc) == []
