"""`verify` checks the sha256 `pruning.json` records for each shard (whole, or per part), and
`cleanup` lists and removes what a killed run left (no Ray needed for these)."""

from __future__ import annotations

import json
import os

import pytest

from planners.plan import Plan
from rewriter.exec.dest.destination import open_destination
from rewriter.exec.publish.verify import verify
from rewriter.exec.run.executor import execute
from tests.conftest import cli


def _run(tiny, tiny_saliency, tmp_path):
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-n", "4", "--out", tmp_path / "p.json")
    plan = Plan.load(str(tmp_path / "p.json"))
    dst = tmp_path / "dst"
    execute(plan, str(dst))
    return plan, dst


def test_verify_fails_when_a_recorded_hash_disagrees(tiny, tiny_saliency, tmp_path):
    plan, dst = _run(tiny, tiny_saliency, tmp_path)
    assert verify(str(tiny), str(dst)).ok
    doc = json.loads((dst / "pruning.json").read_text())
    name = plan.outputs[-1].name
    good = doc["shards"][name]["sha256"]
    doc["shards"][name]["sha256"] = "0" * 64
    (dst / "pruning.json").write_text(json.dumps(doc))
    report = verify(str(tiny), str(dst))
    assert not report.ok and not report.mismatches  # the bytes are right; the record is not
    assert len(report.problems) == 1 and name in report.problems[0] and good in report.problems[0]
    out = cli("verify", tiny, dst, expect=1)
    assert f"{name}: sha256 {good} differs from the {'0' * 64} recorded in pruning.json" in out
    # Parts records are checked part by part; a record that covers nothing is a problem too.
    size = plan.outputs[-1].size
    half = size // 2
    import hashlib

    data = (dst / name).read_bytes()
    doc["shards"][name] = {"size": size, "parts": [
        {"start": 0, "length": half, "sha256": hashlib.sha256(data[:half]).hexdigest()},
        {"start": half, "length": size - half, "sha256": "1" * 64}]}
    (dst / "pruning.json").write_text(json.dumps(doc))
    report = verify(str(tiny), str(dst))
    assert [p for p in report.problems if f"part 1 (bytes {half:,}-{size:,})" in p and name in p]
    assert len(report.problems) == 1
    doc["shards"][name]["parts"][1]["sha256"] = hashlib.sha256(data[half:]).hexdigest()
    (dst / "pruning.json").write_text(json.dumps(doc))
    assert verify(str(tiny), str(dst)).ok
    doc["shards"][name] = {"size": size, "parts": [{"start": 0, "length": "x"}]}
    (dst / "pruning.json").write_text(json.dumps(doc))
    assert any(f"shards.{name}.parts[0] needs an integer start" in p for p in verify(str(tiny), str(dst)).problems)


def test_verify_still_finds_a_changed_tensor(tiny, tiny_saliency, tmp_path):
    plan, dst = _run(tiny, tiny_saliency, tmp_path)
    out = plan.outputs[0]
    t = out.tensors[-1]
    with open(dst / out.name, "r+b") as f:
        f.seek(out.size - 1)
        last = f.read(1)
        f.seek(out.size - 1)
        f.write(bytes([last[0] ^ 1]))
    report = verify(str(tiny), str(dst))
    assert t.name in report.mismatches
    assert any(out.name in p and "recorded in pruning.json" in p for p in report.problems)


def test_cleanup_lists_then_removes_part_files_and_temporaries(tiny, tiny_saliency, tmp_path):
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-n", "4", "--out", tmp_path / "p.json")
    plan = Plan.load(str(tmp_path / "p.json"))
    dst = open_destination(str(tmp_path / "dst"))
    # What a killed run leaves: an attempt at a shard in parts, a temporary, a part journal.
    handle = dst.begin_parts(plan.outputs[0].name, 1000, plan.digest)
    dst.put_bytes(".rewriter/tmp/x.safetensors.123.part", b"half")
    dst.put_bytes(".rewriter/parts.json", b"{}")
    dst.put_bytes(".rewriter/journal.json", json.dumps({"plan": plan.digest, "shards": {}}).encode())
    out = cli("cleanup", tmp_path / "dst", "--dry-run")
    assert f"would remove part file {handle}" in out and "would remove" in out and "3 leftovers" in out
    assert (tmp_path / "dst" / ".rewriter" / "parts.json").exists()
    out = cli("cleanup", tmp_path / "dst")
    assert f"removed part file {handle}" in out
    left = sorted(p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*") if p.is_file())
    assert left == [".rewriter/journal.json", ".rewriter/lock"]  # the journal stays: a run resumes from it
    execute(plan, str(tmp_path / "dst"))
    assert verify(str(tiny), str(tmp_path / "dst")).ok
    assert "nothing of a run to clean" in cli("cleanup", tmp_path / "dst")  # a finished run keeps no state


def test_every_attempt_writes_under_its_own_name(tmp_path):
    """Two writers of one shard (two drivers, or a retry beside a stuck attempt) never share a
    temporary: each attempt at a shard in parts, and each whole-shard output, has its own file."""
    dst = open_destination(str(tmp_path / "dst"))
    a = dst.begin_parts("m.safetensors", 10 << 20, "f" * 64)
    b = dst.begin_parts("m.safetensors", 10 << 20, "f" * 64)
    assert a != b and os.path.getsize(a) == os.path.getsize(b) == 10 << 20
    outs = [dst.create_output("m.safetensors", 1 << 20) for _ in range(2)]
    try:
        assert outs[0].tmp != outs[1].tmp  # type: ignore[attr-defined]
    finally:
        for o in outs:
            o.abort()
    assert sorted(h for _, h in dst.leftover_parts()) == sorted([a, b])


@pytest.mark.s3
def test_cleanup_aborts_open_multipart_uploads(s3):
    s3.make_bucket("leftovers")
    opts = json.dumps(s3.options)
    dst = open_destination("s3://leftovers/out", s3.options)
    upload = dst.begin_parts("model-00001-of-00002.safetensors", 20 << 20, "f" * 64)
    dst.part_output("model-00001-of-00002.safetensors", upload, 0, 5 << 20).write(b"x" * (5 << 20))
    dst.put_bytes(".rewriter/parts.json", b"{}")
    other = open_destination("s3://leftovers/elsewhere", s3.options).begin_parts("m.safetensors", 1, "f" * 64)
    out = cli("cleanup", "s3://leftovers/out", "--dst-options", opts, "--dry-run")
    assert f"would abort multipart upload {upload} of s3://leftovers/out/model-00001-of-00002.safetensors" in out
    assert other not in out  # below another destination: not this one's to abort
    out = cli("cleanup", "s3://leftovers/out", "--dst-options", opts)
    assert f"aborted multipart upload {upload}" in out
    left = s3.fs().call_s3("list_multipart_uploads", Bucket="leftovers").get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other]
    assert not dst.exists(".rewriter/parts.json")
