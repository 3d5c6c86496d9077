"""The Ctrl-C tests see their interrupt however the suite was started: as a background job (which
a shell starts with SIGINT ignored) too, and after a test that changed the SIGINT handler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _pytest(args: list[str], cwd: Path, sigint: signal.Handlers) -> subprocess.CompletedProcess:
    """pytest in a new process that starts with SIGINT set to ``sigint``, as a shell would start it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


@pytest.mark.slow
def test_ctrl_c_tests_pass_in_a_suite_started_with_sigint_ignored():
    names = ["tests/cli/test_cli_edges.py::test_an_interrupted_synth_leaves_no_temporary_and_can_be_run_again",
             "tests/cli/test_status_stopped.py::test_interrupted_run_reads_as_interrupted_not_failed"]
    r = _pytest(names, REPO, signal.SIG_IGN)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout + r.stderr


def test_a_test_that_leaves_the_sigint_handler_changed_fails_by_name(tmp_path):
    (tmp_path / "test_handlers.py").write_text(
        "import signal\n"
        "def test_ignores_ctrl_c():\n"
        "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "def test_restores_what_it_changes():\n"
        "    before = signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
        "    signal.signal(signal.SIGINT, before)\n"
        "def test_after_them():\n"
        "    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    r = _pytest(["-p", "tests.conftest", "test_handlers.py"], tmp_path, signal.SIG_DFL)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "3 passed, 1 error" in out, out
    assert "ERROR at teardown of test_ignores_ctrl_c" in out, out
    assert "test_handlers.py::test_ignores_ctrl_c (or a fixture it set up) left the SIGINT handler" in out, out
