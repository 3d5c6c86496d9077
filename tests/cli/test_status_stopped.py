"""`rewriter status` after a driver killed outright (SIGKILL: `stopped`, exit 1) or interrupted
(SIGINT: `interrupted`, exit 0), both with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewriter.exec.dest.runstatus import STATUS_NAME
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import cli, sigint_disposition

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stopped")
    write_checkpoint(root / "src", PRESETS["small"])
    synthetic_saliency(4, 32, 4, seed=2).save(root / "s.json")
    cli("plan", root / "src", "--saliency", root / "s.json", "--keep-frac", "0.5", "--max-shard-size", "6MB",
        "--out", root / "plan.json")
    return root / "plan.json"


def _run_held_after_first_shard(plan: Path, dst: Path) -> subprocess.Popen:
    """Start `rewriter run` and SIGSTOP it as soon as its journal holds a shard (a run part done)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "rewriter.cli", "run", str(plan), "--out", str(dst), "--quiet",
                             "--no-zero-copy", "--buffer-mib", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    journal = dst / ".rewriter" / "journal.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(journal.read_text())["shards"]:
                proc.send_signal(signal.SIGSTOP)
                return proc
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.0005)
    proc.kill()
    pytest.fail(f"the run ended (status {proc.poll()}) before it could be held mid-way")


def test_killed_driver_reads_as_stopped_with_the_journaled_shards(plan_path, tmp_path):
    dst = tmp_path / "k2"
    proc = _run_held_after_first_shard(plan_path, dst)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    journaled = json.loads((dst / ".rewriter" / "journal.json").read_text())["shards"]
    out = cli("status", dst, expect=1)
    assert "state:      stopped" in out and f"process {proc.pid} on this host" in out and "run the same command" in out
    assert f"shards:     {len(journaled)} of " in out and "bytes:      0 B" not in out
    doc = json.loads(cli("status", dst, "--json", expect=1))["run"]
    assert doc["state"] == "stopped" and doc["bytes_done"] >= sum(r["size"] for r in journaled.values())
    # A pid the system gave to another program since (started after the run) is no driver either;
    # the document is edited to name one, as a reused pid cannot be had on demand.
    other = subprocess.Popen(["sleep", "30"])
    try:
        raw = json.loads((dst / STATUS_NAME).read_text())
        (dst / STATUS_NAME).write_text(json.dumps({**raw, "pid": other.pid, "started_unix": time.time() - 60}))
        assert "state:      stopped" in cli("status", dst, expect=1)
        (dst / STATUS_NAME).write_text(json.dumps({**raw, "pid": os.getpid()}))  # alive, started before the run
        assert "state:      running" in cli("status", dst, expect=0)
    finally:
        other.kill()
        other.wait()
    cli("run", plan_path, "--out", dst, "--quiet")  # the same command resumes
    assert "state:      complete" in cli("status", dst)


def test_interrupted_run_reads_as_interrupted_not_failed(plan_path, tmp_path):
    dst = tmp_path / "i"
    proc = _run_held_after_first_shard(plan_path, dst)
    disposition = sigint_disposition(proc.pid)
    assert disposition in ("caught", None), (
        f"precondition: the run's process does not catch SIGINT (its disposition is {disposition}, "
        "inherited from the test process), so the interrupt sent to it would not reach Python")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"exit {proc.returncode} after SIGINT reached a run held mid-way:\n{stderr}"
    doc = json.loads((dst / STATUS_NAME).read_text())
    assert doc["state"] == "interrupted" and doc["error"] is None
    out = cli("status", dst, expect=0)
    assert "state:      interrupted" in out and "interrupted; run the same command again to resume" in out
    assert "KeyboardInterrupt" not in out
