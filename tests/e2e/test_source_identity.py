"""The source is decided by identity, SIGTERM stops a run as Ctrl-C does, and every input of a run
is checked before its first byte: through the commands a user runs (real processes, real mounts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.storage import Storage
from rewriter.tools.synth import PRESETS, write_checkpoint
from tests.conftest import source_digest, tree_digest
from tests.e2e import test_promises
from tests.e2e.test_promises import plan_file, popen, prune_args, rewriter

small = test_promises.small  # the module's fixture: the `small` preset and a saliency file

REFUSED = "the source is never modified or removed"


@pytest.fixture
def bind_of(tmp_path) -> Iterator:
    """``bind_of(folder, name)``: a bind mount of ``folder`` at ``tmp_path/name``; unmounted afterwards."""
    made: list[Path] = []

    def bind(folder: Path, name: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a bind mount needs root and mount(8)")
        target = tmp_path / name
        target.mkdir()
        r = subprocess.run(["mount", "--bind", str(folder), str(target)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"bind mounts are not permitted here: {r.stderr.strip()}")
        made.append(target)
        return target

    yield bind
    for target in reversed(made):
        subprocess.run(["umount", str(target)], check=False)


def _refused(r: subprocess.CompletedProcess, *names: object) -> None:
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and REFUSED in r.stderr, r.stderr
    for name in names:
        assert str(name) in r.stderr, r.stderr


# --- 1. is this the source? ------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "prune", "soft-prune"])
def test_bind_mount_of_the_source_is_refused_even_with_force(small, tmp_path, bind_of, command):
    src, sal = small
    before = source_digest(src)
    bind = bind_of(src, "bind")
    plan = plan_file(src, sal, tmp_path / "plan.json")
    for dst in (bind, bind / "sub"):
        for force in ([], ["--force"]):
            args = ["run", plan, "--out", dst, "--quiet"] if command == "run" else prune_args(src, sal, dst, command)
            r = rewriter(*args, *force, expect=2)
            _refused(r, dst, src)
            assert ("lies inside the source" if dst.name == "sub" else "is the source") in r.stderr
    assert source_digest(src) == before
    assert sorted(p.name for p in bind.iterdir()) == sorted(p.name for p in src.iterdir())
    assert not (src / "sub").exists() and not (src / ".rewriter").exists()


def test_folder_holding_a_bind_mount_of_the_source_is_refused(small, tmp_path, bind_of):
    src, sal = small
    (tmp_path / "outer").mkdir()
    inner = bind_of(src, "outer/ckpt")
    before = source_digest(src)
    r = rewriter(*prune_args(src, sal, tmp_path / "outer"), "--force", expect=2)
    _refused(r, inner)
    assert source_digest(src) == before and sorted(p.name for p in inner.iterdir()) == sorted(p.name for p in src.iterdir())


def test_dotdot_and_symlinked_parent_spellings_of_the_source_are_refused(small, tmp_path):
    src, sal = small
    before = source_digest(src)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(src.parent)
    plan = plan_file(src, sal, tmp_path / "plan.json")
    spellings = [tmp_path / "elsewhere" / ".." / os.path.relpath(src, tmp_path),
                 tmp_path / "link" / src.name, tmp_path / "link" / src.name / "out", src.parent]
    for dst in spellings:
        _refused(rewriter("run", plan, "--out", dst, "--force", "--quiet", expect=2), dst)
    assert source_digest(src) == before


def test_destination_holding_a_hard_link_of_a_source_shard_is_refused(small, tmp_path):
    src, sal = small
    shard = sorted(src.glob("*.safetensors"))[0]
    dst = tmp_path / "dst"
    dst.mkdir()
    os.link(shard, dst / "model-00000-of-00009.safetensors")
    before = source_digest(src)
    for command in ("prune", "soft-prune"):
        r = rewriter(*prune_args(src, sal, dst, command), "--force", expect=2)
        _refused(r, dst / "model-00000-of-00009.safetensors", shard)
        assert "hard link" in r.stderr
    assert source_digest(src) == before and shard.stat().st_nlink == 2
    assert sorted(p.name for p in dst.iterdir()) == ["model-00000-of-00009.safetensors"]


def test_synth_force_replaces_hard_linked_files_instead_of_writing_into_them(tmp_path):
    """`synth --force` over a folder of hard links (`cp -al`) leaves the linked checkpoint as it was."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_checkpoint(a, PRESETS["tiny"])
    (a / "config.json").write_text('{"mine": true}\n')
    b.mkdir()
    for f in a.iterdir():
        os.link(f, b / f.name)
    before = tree_digest(a)
    rewriter("synth", "--preset", "tiny-bf16", "--force", "--quiet", b)
    assert tree_digest(a) == before
    assert tree_digest(b) != before


def test_object_store_locations_are_compared_after_normalisation():
    src = Storage("memory://bucket/ckpt")
    for spelling in ("memory://bucket//ckpt/", "memory://bucket/./ckpt", "memory://bucket/ckpt//sub"):
        assert Storage(spelling).is_within(src), spelling
    assert not Storage("memory://bucket/ckpt2").is_within(src)
    assert src.is_within(Storage("memory://bucket/"))


# --- 2. SIGTERM ------------------------------------------------------------------------------------

def _terminate_mid_run(args: list[object], dst: Path) -> subprocess.CompletedProcess:
    """Start the CLI, stop it once a shard is being written (its ``.part`` temporary exists), send
    SIGTERM and let it go on: what it does with the signal, wherever in the shard it arrived."""
    proc = popen(*args)
    tmp = dst / ".rewriter" / "tmp"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if tmp.is_dir() and any(tmp.glob("*.part")):
            proc.send_signal(signal.SIGSTOP)
            break
        time.sleep(0.0005)
    else:
        proc.kill()
        pytest.fail("the run ended before a shard was being written")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "prune", "soft-prune"])
def test_sigterm_mid_run_is_reported_and_the_same_command_resumes(small, tmp_path, command):
    src, sal = small
    before = source_digest(src)
    if command == "run":
        plan = plan_file(src, sal, tmp_path / "plan.json")
        make = lambda d: ["run", plan, "--out", d, "--quiet"]  # noqa: E731
    else:
        make = lambda d: prune_args(src, sal, d, command)  # noqa: E731
    rewriter(*make(tmp_path / "ref"))
    expected = tree_digest(tmp_path / "ref")
    dst = tmp_path / "dst"
    r = _terminate_mid_run([*make(dst), "--no-zero-copy", "--buffer-mib", "1"], dst)
    assert r.returncode == 143, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: terminated (SIGTERM); the shards finished so far are kept in")
    assert "run the same command again to resume" in r.stderr
    assert not list(dst.rglob("*.part")) and not list(dst.rglob("*.tmp"))
    status = json.loads((dst / ".rewriter" / "status.json").read_text())
    assert status["state"] == "interrupted"
    assert "interrupted" in rewriter("status", dst).stdout
    rewriter(*make(dst))
    assert tree_digest(dst) == expected and not (dst / ".rewriter").exists()
    assert source_digest(src) == before


def test_sigterm_under_json_is_one_json_document_and_143(small, tmp_path):
    src, sal = small
    dst = tmp_path / "dst"
    r = _terminate_mid_run([*prune_args(src, sal, dst), "--no-zero-copy", "--buffer-mib", "1", "--json"], dst)
    assert r.returncode == 143, r.stderr
    doc = json.loads(r.stdout)
    assert doc["exit_status"] == 143 and doc["error"].startswith("terminated (SIGTERM)")


def test_help_and_readme_document_143():
    assert "143 terminated (SIGTERM" in rewriter("run", "--help").stdout.replace("\n", " ").replace("  ", " ")
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "| `143` |" in readme


# --- 3. every input checked before the first byte ------------------------------------------------

@pytest.fixture
def own_small(small, tmp_path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    shutil.copytree(small[0], src)
    (src / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return src, small[1]


def test_a_missing_file_to_copy_stops_run_before_anything_is_written(own_small, tmp_path):
    src, sal = own_small
    plan = plan_file(src, sal, tmp_path / "plan.json")
    assert "tokenizer.json" in json.loads(plan.read_text())["copy_files"]
    (src / "tokenizer.json").unlink()
    dst = tmp_path / "dst"
    r = rewriter("run", plan, "--out", dst, "--quiet", expect=2)
    assert r.stderr.count("\n") == 1 and str(src / "tokenizer.json") in r.stderr and "copy_files" in r.stderr
    assert not dst.exists()


def test_a_folder_planned_as_a_file_stops_run_before_anything_is_written(own_small, tmp_path):
    src, sal = own_small
    plan = plan_file(src, sal, tmp_path / "plan.json")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").mkdir()
    (src / "tokenizer.json" / "inner").write_text("x")
    dst = tmp_path / "dst"
    r = rewriter("run", plan, "--out", dst, "--quiet", expect=2)
    assert r.stderr.count("\n") == 1 and str(src / "tokenizer.json") in r.stderr
    assert not dst.exists()


def test_a_symlinked_folder_in_the_source_is_copied_as_a_folder(own_small, tmp_path):
    src, sal = own_small
    shared = tmp_path / "shared-tokenizer"
    (shared / "sub").mkdir(parents=True)
    (shared / "vocab.txt").write_text("a b c\n")
    (shared / "sub" / "merges.txt").write_text("a b\n")
    (src / "tok").symlink_to(shared)
    dst = tmp_path / "dst"
    rewriter(*prune_args(src, sal, dst))
    assert (dst / "tok" / "vocab.txt").read_text() == "a b c\n"
    assert (dst / "tok" / "sub" / "merges.txt").read_text() == "a b\n"
    assert not (dst / "tok").is_symlink()
    rewriter("verify", src, dst)
