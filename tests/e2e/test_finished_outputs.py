"""A finished output stays finished: `card` leaves no tool state in it, `verify` refuses a source
the output was not made from before reading any tensor, and `run --ray` gives up on a cluster it
cannot reach."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from rewriter.tools.synth import PRESETS, write_checkpoint
from tests.e2e.test_promises import mounts, plan_file, prune_args, rewriter, small  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny, tiny_saliency) -> tuple[Path, Path]:
    """A plan of `tiny` and its finished output."""
    d = tmp_path_factory.mktemp("made")
    plan = plan_file(tiny, tiny_saliency, d / "plan.json")
    rewriter("run", plan, "--out", d / "out", "--quiet")
    return plan, d / "out"


def files_under(root: Path) -> set[str]:
    return {str(Path(d, n).relative_to(root)) for d, dirs, fs in os.walk(root) for n in (*dirs, *fs)}


@pytest.mark.parametrize("extra", [(), ("--verify",)])
def test_card_leaves_no_state_in_a_finished_output(made, tiny, tmp_path, extra):
    out = tmp_path / "out"
    shutil.copytree(made[1], out)
    before = files_under(out)
    assert not any(f.startswith(".rewriter") for f in before)
    rewriter("card", out, *extra, *(("--src", tiny) if extra else ()))
    assert files_under(out) == before


def test_card_keeps_the_journal_of_an_unfinished_forced_run(made, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(made[1], out)
    (out / ".rewriter").mkdir()
    (out / ".rewriter" / "journal.json").write_text("{}")
    rewriter("card", out)
    left = files_under(out / ".rewriter")
    assert "journal.json" in left and not [f for f in left if f.startswith("tmp/")]
    assert (out / ".rewriter" / "journal.json").read_text() == "{}"


def test_card_waits_for_a_run_that_holds_the_destination(made, tmp_path):
    import fcntl

    out = tmp_path / "out"
    shutil.copytree(made[1], out)
    (out / ".rewriter").mkdir()
    with open(out / ".rewriter" / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = rewriter("card", out, expect=75)
    assert "is in use" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("which", ["bf16", "bigger", "itself"])
def test_verify_names_the_recorded_source_when_given_another(made, tiny, tmp_path, which):
    out = made[1]
    if which == "itself":
        other = out
    else:
        other = tmp_path / which
        write_checkpoint(other, PRESETS["tiny-bf16"] if which == "bf16" else PRESETS["small"])
    r = rewriter("verify", other, out, expect=2)
    assert not r.stdout and r.stderr.count("\n") == 1, r.stderr
    assert f"error: {other} is not the source of {out}: that was made from a local folder named '{tiny.name}'" in r.stderr
    assert f"{out / 'pruning.json'}" in r.stderr and "file not found" not in r.stderr
    r = rewriter("verify", other, out, "--json", expect=2)
    assert "is not the source of" in r.stdout


def test_verify_accepts_a_copy_of_the_source_elsewhere(made, tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    assert rewriter("verify", copy, made[1]).stdout.strip().endswith("OK")
    other = tmp_path / "other"
    write_checkpoint(other, dataclasses.replace(PRESETS["tiny"], vocab=320))
    r = rewriter("verify", other, made[1], expect=2)
    assert "has a different shard" in r.stderr


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:1", "no answer within 3 s"),  # nothing listens on port 1
    ("not-an-address", "Invalid address format"),
])
def test_ray_run_gives_up_on_a_cluster_it_cannot_reach(made, tmp_path, address, says):
    pytest.importorskip("ray")
    t0 = time.monotonic()
    r = rewriter("run", made[0], "--out", tmp_path / "out", "--ray", "--address", address, "--ray-timeout", "3",
                 expect=2)
    assert time.monotonic() - t0 < 60
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"the Ray cluster at {address}" in errors[0] and says in errors[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_ray_timeout_must_be_positive(made, tmp_path):
    r = rewriter("run", made[0], "--out", tmp_path / "out", "--ray", "--ray-timeout", "0", expect=2)
    assert "--ray-timeout" in r.stderr and r.stderr.count("\n") == 1


def test_force_over_a_foreign_checkpoint_says_what_it_removes(made, tiny, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(tiny, dst)
    (dst / "notes.txt").write_text("mine\n")
    r = rewriter("run", made[0], "--out", dst, "--force", "--quiet")
    assert "clearing earlier output" not in r.stderr
    line = next(x for x in r.stderr.splitlines() if "--force" in x)
    assert f"{dst} holds files this tool did not write; removing 4 of its files" in line
    assert "model-00002-of-00002.safetensors, model.safetensors.index.json" in line
    assert "left in place: config.json, generation_config.json, notes.txt" in line
    assert (dst / "notes.txt").read_text() == "mine\n"
    assert rewriter("verify", tiny, dst).stdout.strip().endswith("OK")
    other = tmp_path / "other.json"
    rewriter("plan", tiny, "--keep-list", _keep_list(tmp_path), "--out", other)
    r = rewriter("run", other, "--out", dst, "--force", "--quiet")
    assert f"{dst} holds the output of another plan; removing 3 of its files" in r.stderr


def _keep_list(tmp_path: Path) -> Path:
    keep = tmp_path / "keep.json"
    keep.write_text('{"0": [0, 1], "1": [2, 3]}')
    return keep


#: Where the disk fills, as a file operation of the run (tests.file_events): after the first shard
#: is journaled, before the next shard's file is made, the journal is written again, or the
#: status document is.
FULL_AT = {
    "a shard": "rename:journal.json#2>open:*.safetensors.part#1",
    "the journal": "rename:journal.json#2>open:journal.json.tmp#1",
    "the status document": "rename:journal.json#2>open:status.json.tmp#1",
}


@pytest.mark.parametrize("full_at", FULL_AT)
def test_a_full_disk_says_which_shards_are_kept_for_the_resume(small, tmp_path, mounts, full_at):  # noqa: F811
    """Whichever write meets the full disk, the one error line counts the shards kept, which are
    the shard files in the destination and the journal's; the same command resumes from them."""
    from tests.conftest import tree_digest
    from tests.e2e.test_promises import at_file_operation
    from tests.file_events import fill

    src, sal = small
    rewriter(*prune_args(src, sal, tmp_path / "ref"))
    disk = mounts("disk", "size=64m")
    dst, filler = disk / "dst", disk / "filler"
    r = at_file_operation(dst, f"fill={filler}", FULL_AT[full_at], prune_args(src, sal, dst))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    kept = sorted(p.name for p in dst.glob("*.safetensors"))
    journaled = sorted(json.loads((dst / ".rewriter" / "journal.json").read_text())["shards"])
    total = len(list((tmp_path / "ref").glob("*.safetensors")))
    assert kept == journaled and 0 < len(kept) < total
    assert "nothing was published" not in r.stderr and r.stderr.count("\n") == 1
    assert (f"no space left on the destination (No space left on device); {len(kept)} of {total} shards are "
            f"finished and kept in {dst}: free space and run the same command again to resume") in r.stderr
    if full_at == "the journal":
        assert r.stderr.startswith(f"error: {dst / '.rewriter' / 'journal.json'}: no space left"), r.stderr
    # Run again on a disk still full (what the failed shard's temporary file held is taken too):
    # the journal is its first write, and the error counts the same shards.
    fill(str(disk / "more"))
    again = rewriter(*prune_args(src, sal, dst), expect=2)
    assert again.stderr.count("\n") == 1 and f"; {len(kept)} of {total} shards are finished and kept" in again.stderr
    assert sorted(p.name for p in dst.glob("*.safetensors")) == kept
    filler.unlink()
    (disk / "more").unlink()
    r = rewriter(*prune_args(src, sal, dst)[:-1])
    assert f"({len(kept)} resumed)" in r.stdout
    assert tree_digest(dst) == tree_digest(tmp_path / "ref")


def test_a_disk_full_before_the_first_write_is_one_clear_error(small, tmp_path, mounts):  # noqa: F811
    """Full before the lock records its owner: the run says no shard was finished, and leaves
    nothing behind in the destination it created."""
    from tests.e2e.test_promises import at_file_operation

    src, sal = small
    disk = mounts("disk", "size=16m")
    dst = disk / "dst"
    r = at_file_operation(dst, f"fill={disk / 'filler'}", "open:lock#1", prune_args(src, sal, dst))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {dst / '.rewriter' / 'journal.json'}: no space left on the destination")
    assert "no shard of 10 was finished: free space and run the same command again to resume" in r.stderr
    assert not dst.exists()
