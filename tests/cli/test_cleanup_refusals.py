"""`rewriter cleanup` refuses what is not a destination folder, changes nothing where no run
kept state, and `--dry-run` reads without the lock while a run holds it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import cli


@pytest.mark.parametrize("what", ["missing", "file", "empty", "/dev/null", "memory://nothing"])
def test_cleanup_refuses_what_is_not_a_folder(tmp_path, what):
    (tmp_path / "plan.json").write_text("{}")
    dst = {"missing": str(tmp_path / "nonexist"), "file": str(tmp_path / "plan.json"), "empty": ""}.get(what, what)
    for dry in ([], ["--dry-run"]):
        out = cli("cleanup", dst, *dry, expect=2)
        assert out.startswith("error:") and "leftovers" not in out
        assert ("is empty" if what == "empty" else "is not a folder" if what in ("file", "/dev/null")
                else "does not exist") in out
        if what != "empty":
            assert dst.split("://")[-1] in out
    assert not (tmp_path / "nonexist").exists() and (tmp_path / "plan.json").read_text() == "{}"


def test_cleanup_of_a_folder_no_run_wrote_changes_nothing(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    for dry in (["--dry-run"], []):
        out = cli("cleanup", tmp_path / "d", *dry)
        assert "nothing of a run to clean" in out and "nothing changed" in out
        assert sorted(p.name for p in (tmp_path / "d").rglob("*")) == ["notes.txt"]


_HOLD = ("import sys; from core.storage import Storage; from rewriter.exec.dest.lock import DestinationLock\n"
         "with DestinationLock(Storage(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()\n")


def test_dry_run_lists_without_the_lock_while_a_run_holds_it(tmp_path):
    dst = tmp_path / "dst"
    (dst / ".rewriter" / "tmp").mkdir(parents=True)
    (dst / ".rewriter" / "tmp" / "x.safetensors.1.part").write_bytes(b"half")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(dst)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        out = cli("cleanup", dst, "--dry-run")
        assert "would remove" in out and "1 leftovers" in out
        assert f"a run is in progress (process {holder.pid} on host" in out
        assert "in use" in cli("cleanup", dst, expect=75)  # removing still waits for the run
        assert (dst / ".rewriter" / "tmp" / "x.safetensors.1.part").exists()
    finally:
        holder.communicate("")
    out = cli("cleanup", dst, "--dry-run")
    assert "1 leftovers" in out and "in progress" not in out
    assert "1 leftovers of killed runs cleaned up" in cli("cleanup", dst)
    assert not (dst / ".rewriter").exists()
