"""`rewriter submit`, `status` and `logs` against a real Ray cluster with its job service."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from planners.plan import Plan
from rewriter.tools.synth import Geometry, synthetic_saliency, write_checkpoint
from tests.conftest import cli
from tests.ray_job_cluster import job_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def jobs():
    pytest.importorskip("ray")
    with job_cluster() as address:
        yield address


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    """Two 2880-wide MoE layers of 32 experts (sparse source: real headers over holes), ~200 MB
    written: long enough to be seen running."""
    root = tmp_path_factory.mktemp("jobs")
    g = Geometry(2, 32, 4, 2880, 2880, 1024, 64, 8, 64, 150_000_000)
    write_checkpoint(root / "src", g, sparse=True)
    synthetic_saliency(2, 32, 4, seed=2).save(root / "s.json")
    cli("plan", root / "src", "--saliency", root / "s.json", "--keep-frac", "0.5", "--max-shard-size", "60MB",
        "--out", root / "plan.json")
    return root / "plan.json"


def _status(address: str, target: str, expect: int | None = None) -> dict:
    return json.loads(cli("status", target, "--address", address, "--json", expect=expect))


def _wait_ended(address: str, job: str) -> dict:
    while True:  # bounded by the test timeout, not by a guess of how long the job takes
        doc = _status(address, job)
        if doc["job"]["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return doc
        time.sleep(0.5)


def test_submit_status_logs_verify(jobs, plan_file, tmp_path):
    dst = tmp_path / "out"
    job = cli("submit", plan_file, "--out", dst, "--address", jobs, "--workers", "1", "--no-zero-copy",
              "--buffer-mib", "1").splitlines()[0]
    seen = None
    while seen is None:  # the driver publishes the document as soon as it starts writing
        doc = _status(jobs, job)
        if doc["run"] and doc["run"]["state"] == "running":
            seen = doc["run"]
            os.kill(seen["pid"], signal.SIGSTOP)  # hold the driver, so the running state can be read at leisure
        else:
            assert doc["job"]["status"] in ("PENDING", "RUNNING"), doc
            time.sleep(0.05)
    try:
        out = cli("status", job, "--address", jobs)
        assert f"job:        {job} RUNNING" in out and "state:      running" in out
        total = Plan.load(str(plan_file)).outputs
        assert f"of {len(total)}" in out and "bytes:" in out and "ETA" in out
    finally:
        os.kill(seen["pid"], signal.SIGCONT)
    doc = _wait_ended(jobs, job)
    assert doc["job"]["status"] == "SUCCEEDED", doc
    assert doc["run"]["state"] == "complete" and doc["run"]["bytes_done"] == doc["run"]["bytes_total"] > 0
    assert doc["job"]["metadata"]["rewriter_dst"] == str(dst)
    assert "mismatches: 0, problems: 0 -> OK" in cli("verify", plan_file.parent / "src", dst)
    assert "complete" in cli("status", dst)  # the destination alone, no cluster
    logs = cli("logs", job, "--address", jobs)
    assert f"wrote {dst}:" in logs
    assert f"wrote {dst}:" in cli("logs", job, "--address", jobs, "--follow")  # ended: prints all, returns


def test_failed_job_shows_failed_with_the_error(jobs, plan_file, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    dst = tmp_path / "file" / "out"
    job = cli("submit", plan_file, "--out", dst, "--address", jobs, "--quiet").splitlines()[0]
    doc = _wait_ended(jobs, job)
    assert doc["job"]["status"] == "FAILED"
    assert "is a file" in doc["job"]["error"] or "lies below" in doc["job"]["error"]
    assert doc["run"] is None and "cannot read the run's status" in doc["run_error"]
    out = cli("status", job, "--address", jobs, expect=1)
    assert "FAILED" in out and "job error:  destination" in out


def test_clear_errors(jobs, plan_file, tmp_path):
    out = cli("status", "raysubmit_doesnotexist", "--address", jobs, expect=2)
    assert "error: no job 'raysubmit_doesnotexist' on the Ray cluster" in out
    out = cli("logs", "raysubmit_doesnotexist", "--address", jobs, expect=2)
    assert "no job 'raysubmit_doesnotexist'" in out
    # Nothing listens on this port: refused at once; a bounded wait otherwise.
    from tests.ray_job_cluster import free_ports

    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    out = cli("status", "raysubmit_x", "--address", dead, "--timeout", "5", expect=2)
    assert "error: cannot reach the Ray job service at" in out or "did not answer within 5 s" in out
    out = cli("submit", plan_file, "--out", "relative/out", "--address", jobs, expect=2)
    assert "relative path" in out
    out = cli("status", "raysubmit_x", expect=2)
    assert "--address" in out


def test_killed_driver_shows_failed_and_the_same_submit_completes(jobs, plan_file, tmp_path):
    dst = tmp_path / "out"
    args = ["submit", plan_file, "--out", dst, "--address", jobs, "--workers", "1", "--no-zero-copy", "--buffer-mib", "1"]
    job = cli(*args).splitlines()[0]
    while True:
        doc = _status(jobs, job)
        if doc["run"] and doc["run"]["state"] == "running":
            os.kill(doc["run"]["pid"], signal.SIGKILL)  # the driver, as a lost head node would
            break
        assert doc["job"]["status"] in ("PENDING", "RUNNING"), doc
        time.sleep(0.05)
    doc = _wait_ended(jobs, job)
    assert doc["job"]["status"] == "FAILED" and doc["run"]["state"] == "stopped"  # its driver is gone from this host
    out = cli("status", job, "--address", jobs, expect=1)
    assert "the job ended while the run was writing" in out and "FAILED" in out
    again = cli(*args).splitlines()[0]
    assert _wait_ended(jobs, again)["job"]["status"] == "SUCCEEDED"
    assert "mismatches: 0, problems: 0 -> OK" in cli("verify", plan_file.parent / "src", dst)


def _wait_running(address: str, job: str) -> dict:
    while True:
        doc = _status(address, job)
        if doc["run"] and doc["run"]["state"] == "running" and doc["job"]["status"] == "RUNNING":
            return doc
        assert doc["job"]["status"] in ("PENDING", "RUNNING"), doc
        time.sleep(0.05)


def test_a_job_refused_by_a_locked_destination_says_so(jobs, plan_file, tmp_path):
    """The refused job (exit 75) does not show the run holding the destination as its own; that
    run, stopped with `ray job stop` (SIGTERM to its driver), reads as interrupted."""
    import subprocess

    from tests.ray_job_cluster import RAY, cluster_env

    dst = tmp_path / "out"
    args = ["submit", plan_file, "--out", dst, "--address", jobs, "--workers", "1", "--no-zero-copy", "--buffer-mib", "1"]
    first = cli(*args).splitlines()[0]
    pid = _wait_running(jobs, first)["run"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # the first run holds the lock while the second is refused
    try:
        second = cli(*args).splitlines()[0]
        doc = _wait_ended(jobs, second)
        out = cli("status", second, "--address", jobs, expect=1)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert doc["job"]["status"] == "FAILED" and doc["job"]["refused"], doc
    assert "refused:    this job never ran: another run holds the destination" in out, out
    assert "the job ended while the run was writing" not in out, out
    subprocess.run([str(RAY), "job", "stop", first, "--address", jobs], env=cluster_env(), check=True,
                   capture_output=True, timeout=60)
    doc = _wait_ended(jobs, first)
    assert doc["job"]["status"] == "STOPPED" and doc["run"]["state"] == "interrupted", doc
    assert "state:      interrupted" in cli("status", first, "--address", jobs, expect=1)


def test_a_job_that_fails_before_the_run_says_why(jobs, plan_file, tmp_path):
    """The cluster's `python` lacks the package (here: -I -S keep it off its module path)."""
    from ray.job_submission import JobSubmissionClient

    from rewriter.tools.jobs import META_DIGEST, META_DST

    dst = tmp_path / "out"
    job = JobSubmissionClient(jobs).submit_job(
        entrypoint=f"python -I -S -m ray_jobs.rewrite {plan_file} --out {dst}",
        metadata={META_DST: str(dst), META_DIGEST: Plan.load(str(plan_file)).digest})
    assert _wait_ended(jobs, job)["job"]["status"] == "FAILED"
    out = cli("status", job, "--address", jobs, expect=1)
    assert "job error:  the job ended before the run could report an error" in out, out
    assert "No module named" in out, out


def test_submit_sends_the_sidecar_of_a_carried_plan(jobs, tmp_path):
    from rewriter.tools.synth import PRESETS
    from tests.carried_util import plain_and_carried
    from tests.conftest import tree_digest

    write_checkpoint(tmp_path / "src", PRESETS["small"])
    _, carried, _ = plain_and_carried(tmp_path / "src", tmp_path)
    assert list(carried.parent.glob("carried-*.safetensors"))
    cli("run", carried, "--out", tmp_path / "local", "--quiet")
    dst = tmp_path / "out"
    job = cli("submit", carried, "--out", dst, "--address", jobs, "--workers", "1").splitlines()[0]
    doc = _wait_ended(jobs, job)
    assert doc["job"]["status"] == "SUCCEEDED", (doc, cli("logs", job, "--address", jobs))
    assert tree_digest(dst) == tree_digest(tmp_path / "local")
