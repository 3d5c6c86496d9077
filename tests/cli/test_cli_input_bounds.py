"""Inputs that must be refused at once, with one `error:` line and exit status 2: JSON inputs that
are not regular files or are far too large, non-finite or absurd numbers, a part size Ray would
refuse only after it started, a path given where a job id is expected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.jsonfile import MAX_JSON_BYTES
from tests.cli.test_cli_errors import assert_error, invoke
from tests.conftest import cli

# --- JSON inputs that are devices, FIFOs or too large ---------------------------------------------


@pytest.fixture
def fifo(tmp_path) -> Path:
    f = tmp_path / "ff"
    os.mkfifo(f)
    return f


@pytest.fixture
def huge(tmp_path) -> Path:
    """A sparse file past the cap (no disk used)."""
    f = tmp_path / "huge.json"
    with open(f, "wb") as h:
        h.truncate(MAX_JSON_BYTES + 1)
    return f


def _json_input_commands(src: Path, sal: Path, bad: object, tmp: Path) -> list[list[object]]:
    return [["run", bad, "--out", tmp / "d"], ["submit", bad, "--out", "/tmp/never-written"],
            ["stability", bad, sal, "--keep-frac", "0.5"], ["stability", sal, bad, "--keep-frac", "0.5"],
            ["plan", src, "--saliency", bad, "--keep-frac", "0.5"], ["plan", src, "--keep-list", bad]]


def test_devices_and_oversized_files_are_refused_as_json_input(tmp_path, tiny, tiny_saliency, huge):
    for bad, says in (("/dev/zero", "is a character device, not a regular file"),
                      (huge, "larger than the 256 MiB a JSON input may be")):
        for args in _json_input_commands(tiny, tiny_saliency, bad, tmp_path):
            assert_error(invoke(*args), contains=f"{bad}: {says}")
    assert not (tmp_path / "d").exists()


def _cli_proc(*args: object) -> subprocess.CompletedProcess[str]:
    # A separate process: a FIFO that were opened would block it, and the timeout says so.
    return subprocess.run([sys.executable, "-m", "rewriter", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_a_fifo_as_json_input_or_plan_out_is_refused_without_blocking(tmp_path, tiny, tiny_saliency, fifo):
    for args in [["run", fifo, "--out", tmp_path / "d"], ["plan", tiny, "--saliency", fifo, "--keep-frac", "0.5"],
                 ["plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", fifo]]:
        r = _cli_proc(*args)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
        assert f"{fifo}" in r.stderr and "is a FIFO (named pipe), not a regular file" in r.stderr


@pytest.mark.parametrize("out", ["/dev/full", "/dev/zero"])
def test_a_device_as_plan_out_is_refused_unread(tiny, tiny_saliency, out):
    line = assert_error(invoke("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", out),
                        contains=f"{out} is a character device, not a regular file")
    assert "--out" in line


def test_a_plan_out_still_replaces_a_plan(tmp_path, tiny, tiny_saliency):
    plan = tmp_path / "p.json"
    args = ["plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", plan]
    cli(*args)
    cli(*args[:-3], "0.25", "--out", plan)  # an existing plan is replaced
    assert '"format"' in plan.read_text()


# --- timeouts: finite and positive ------------------------------------------------------------------------

_TIMEOUTS = [("run", "--ray-timeout"), ("run", "--ray-pending-timeout"), ("prune", "--ray-timeout"),
             ("prune", "--ray-pending-timeout"), ("submit", "--ray-timeout"), ("submit", "--ray-pending-timeout"),
             ("submit", "--timeout"), ("status", "--timeout"), ("logs", "--timeout"), ("verify", "--ray-timeout")]
_ARGS = {"run": ["p.json", "--out", "d"], "prune": ["src", "d", "--keep-frac", "0.5"], "submit": ["p.json", "--out", "/d"],
         "status": ["job1", "--address", "http://127.0.0.1:9"], "logs": ["job1", "--address", "http://127.0.0.1:9"],
         "verify": ["d", "--ray", "--address", "127.0.0.1:9"]}


@pytest.mark.parametrize("command, option", _TIMEOUTS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_every_timeout_is_finite_and_positive(command, option, value):
    line = assert_error(invoke(command, *_ARGS[command], option, value), contains=f"'{option}'")
    assert ("not a finite number" in line) or ("not in the range" in line), line


# --- --part-mib: what the multipart upload can take ------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "submit"])
def test_part_mib_is_checked_before_anything_starts(command):
    for value in ("100", "65", "4", "0", "1000"):
        assert_error(invoke(command, *_ARGS[command], "--part-mib", value),
                     contains=f"{value} MiB is not a part size: give 5 to 64, or a multiple of 64")
    for value in ("5", "64", "128", "1024"):  # accepted: what fails next is the missing plan
        assert_error(invoke(command, *_ARGS[command], "--part-mib", value), contains="p.json: plan file not found")
    assert "5 to 64, or a multiple of 64 above 64" in " ".join(invoke(command, "--help").output.split())


# --- the estimate's inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--latency-ms", "1e308"), ("--latency-ms", "60001"),
                                           ("--link-mbps", "1e-300"), ("--link-mbps", "1e8"),
                                           ("--read-mbps", "1e-300"), ("--write-mbps", "1e-300"),
                                           ("--read-mbps", "0"), ("--read-mbps", "1e308")])
def test_estimate_inputs_have_sane_ranges(tiny, tiny_saliency, option, value):
    assert_error(invoke("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", option, value),
                 contains=f"'{option}'")


def test_estimate_inputs_at_their_bounds_are_taken(tiny, tiny_saliency):
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--latency-ms", "60000",
        "--link-mbps", "0", "--read-mbps", "0.001", "--write-mbps", "1e7")
    assert "0, the default: no cap" in " ".join(invoke("plan", "--help").output.split())


def test_buffer_mib_message_states_the_real_range():
    for value in ("0", "2000"):
        assert_error(invoke("run", *_ARGS["run"], "--buffer-mib", value), contains="give 1-1024")


# --- status: with --address, the argument is a job id ------------------------------------------------------

def test_status_with_address_refuses_a_path_and_never_reads_a_folder(tmp_path, monkeypatch):
    from bench_io.s3server import free_port

    (tmp_path / "out1").mkdir()
    (tmp_path / "out1" / ".rewriter").mkdir()
    monkeypatch.chdir(tmp_path)
    address = f"http://127.0.0.1:{free_port()}"
    for target in (str(tmp_path / "out1"), "out1/", "a/b"):
        assert_error(invoke("status", target, "--address", address), contains=f"{target!r} is not a Ray job id")
    # A folder's name without a '/' is a job id there: the job service is asked, not the folder read.
    assert_error(invoke("status", "out1", "--address", address, "--timeout", "2"),
                 contains=f"cannot reach the Ray job service at {address}")


# --- verify --ray-timeout: the option its message recommends -------------------------------------------

def test_verify_waits_for_a_cluster_as_long_as_ray_timeout_says(tmp_path, tiny, tiny_saliency):
    pytest.importorskip("ray")
    from bench_io.s3server import free_port

    plan, out = tmp_path / "p.json", tmp_path / "out"
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", plan)
    cli("run", plan, "--out", out, "--quiet")
    address = f"127.0.0.1:{free_port()}"
    r = _cli_proc("verify", tiny, out, "--ray", "--address", address, "--ray-timeout", "1.5")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert f"cannot reach the Ray cluster at {address}: no answer within 1.5 s" in r.stderr, r.stderr
    assert "wait longer with --ray-timeout" in r.stderr


def test_a_quiet_ray_run_prints_no_ray_log_lines(tmp_path, tiny, tiny_saliency):
    pytest.importorskip("ray")
    plan = tmp_path / "p.json"
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", plan)
    r = subprocess.run([sys.executable, "-m", "rewriter", "run", str(plan), "--out", str(tmp_path / "o"), "--ray",
                        "--quiet"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr
    assert not [line for line in r.stderr.splitlines() if {"INFO", "WARNING"} & set(line.split())], r.stderr
    assert "wrote" in r.stdout
