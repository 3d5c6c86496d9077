"""The status document a run keeps in DST/.rewriter/status.json, and `rewriter status DST`."""

from __future__ import annotations

import json
import os

import pytest

from core.errors import ExecutionError
from planners.plan import Plan
from rewriter.exec.dest.runstatus import STATUS_NAME, StatusWriter, format_status, read_status
from rewriter.exec.io.copy import IOOptions
from rewriter.exec.run.executor import execute
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import cli


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("status")
    write_checkpoint(root / "src", PRESETS["small"])
    synthetic_saliency(4, 32, 4, seed=1).save(root / "s.json")
    cli("plan", root / "src", "--saliency", root / "s.json", "--keep-frac", "0.5", "--max-shard-size", "12MB",
        "--out", root / "plan.json")
    return root, Plan.load(str(root / "plan.json"))


def _doc(dst) -> dict:
    return json.loads((dst / STATUS_NAME).read_text())


def test_running_document_counts_bytes_and_shards_then_complete(small_plan, tmp_path):
    _, plan = small_plan
    dst = tmp_path / "out"
    seen: list[dict] = []
    writer = StatusWriter(every_s=0)  # every progress call publishes: each state is observable

    def progress(n: int) -> None:
        writer(n)
        seen.append(_doc(dst))

    execute(plan, str(dst), progress=progress, observer=writer, io=IOOptions(jobs=1))  # one shard at a time
    total = sum(o.size for o in plan.outputs)
    assert {d["state"] for d in seen} == {"running"}
    assert all(d["bytes_total"] == total and d["shards_total"] == len(plan.outputs) for d in seen)
    done = [d["bytes_done"] for d in seen]
    assert done == sorted(done) and 0 < done[0] < done[-1] <= total
    assert [d["shards_done"] for d in seen][-1] == len(plan.outputs) - 1  # the last shard's bytes precede its record
    assert seen[0]["rate_bytes_per_s"] is None and seen[0]["eta_s"] is None  # one report: no rate yet
    assert all(d["eta_s"] is not None and d["rate_bytes_per_s"] > 0 for d in seen[1:])
    # The state folder is gone once the output is complete: complete is read from the output.
    assert not (dst / ".rewriter").exists()
    doc = read_status(str(dst))
    assert (doc["state"], doc["bytes_done"], doc["shards_done"]) == ("complete", total, len(plan.outputs))
    assert doc["plan_digest"] == plan.digest
    out = cli("status", dst)
    assert "state:      complete" in out and f"shards:     {len(plan.outputs)} of {len(plan.outputs)}" in out


def test_failed_run_leaves_failed_with_the_error(small_plan, tmp_path):
    """A source shard cut short mid-run (the source changed under the run) fails it; the
    document says failed and why, `status` exits 1, and the fixed run resumes to complete."""
    root, plan = small_plan
    src = tmp_path / "src"
    src.mkdir()
    for f in (root / "src").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    plan_file = tmp_path / "plan.json"
    doc = plan.to_json()
    doc["source"]["url"] = str(src)
    plan_file.write_text(json.dumps(doc))
    p = Plan.load(str(plan_file))
    last = sorted(p.source_shards)[-1]
    dst = tmp_path / "out"
    writer = StatusWriter()
    cut = []

    def progress(n: int) -> None:
        writer(n)
        if not cut:  # the first bytes are copied: cut the source's last shard short
            os.truncate(src / last, 100)
            cut.append(last)

    with pytest.raises(ExecutionError):
        execute(p, str(dst), progress=progress, observer=writer)
    doc = read_status(str(dst))
    assert doc["state"] == "failed" and last in doc["error"]
    out = cli("status", dst, expect=1)
    assert "state:      failed" in out and "error:" in out


def test_status_of_nothing_and_of_a_damaged_document(tmp_path):
    out = cli("status", tmp_path / "none", expect=2)
    assert "holds no output and no run state" in out
    (tmp_path / "d" / ".rewriter").mkdir(parents=True)
    (tmp_path / "d" / STATUS_NAME).write_text('{"format": "moe-rewriter-status", "state": 3}')
    out = cli("status", tmp_path / "d", expect=2)
    assert "is not a status document of this tool" in out


def test_stale_running_document_is_flagged(small_plan, tmp_path):
    _, plan = small_plan
    import time

    clock = [time.time()]  # the driver (this process) started before the run did: not a stopped run
    writer = StatusWriter(clock=lambda: clock[0])
    from rewriter.exec.dest.destination import open_destination

    (tmp_path / "d").mkdir()
    writer.started(open_destination(str(tmp_path / "d")), plan, [])
    doc = read_status(str(tmp_path / "d"), now=clock[0] + 3600)
    assert doc["state"] == "running" and doc["stale_s"] == 3600
    assert "may have stopped" in "\n".join(format_status(doc))
