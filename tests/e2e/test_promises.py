"""What the README, --help and error messages promise, checked through the commands a user runs:
resume of `prune`/`soft-prune`, plans that work from any folder, plans as untrusted input, one run
per destination, clean errors for unwritable destinations, file modes, no leaks on errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.checkpoint import Checkpoint
from core.errors import CheckpointError, DestinationLockedError, ExecutionError, PlanError
from planners.plan import Plan
from planners.saliency import model_identity
from rewriter.exec.dest.lock import LOCK_NAME, LockOwner
from rewriter.exec.publish.verify import verify
from rewriter.exec.run.executor import execute
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import REPO, source_digest, tree_digest

LOCKED = DestinationLockedError.exit_code


def rewriter(*args: object, cwd: Path | None = None, expect: int | None = 0) -> subprocess.CompletedProcess:
    """The real CLI in a child process; asserts its exit status and that it shows no traceback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "rewriter.cli", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    if expect is not None:
        assert r.returncode == expect, f"exit {r.returncode}, expected {expect}:\n{r.stdout}\n{r.stderr}"
    return r


def popen(*args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "rewriter.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """The `small` preset (4 layers x 32 experts, 5 shards) and a saliency file for it."""
    d = tmp_path_factory.mktemp("small")
    write_checkpoint(d / "src", PRESETS["small"])
    synthetic_saliency(4, 32, 4, seed=3, model=model_identity(Checkpoint.open(str(d / "src")))).save(d / "sal.json")
    return d / "src", d / "sal.json"


def prune_args(src: Path, sal: Path, dst: Path, command: str = "prune") -> list[object]:
    return [command, src, dst, "--saliency", sal, "--keep-frac", "0.5", "--max-shard-size", "6MB", "--quiet"]


def plan_file(src: Path, sal: Path, out: Path, *extra: object) -> Path:
    rewriter("plan", src, "--saliency", sal, "--keep-frac", "0.5", "--max-shard-size", "6MB", "--out", out, *extra)
    return out


def journal_shards(dst: Path) -> int:
    try:
        return len(json.loads((dst / ".rewriter" / "journal.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def kill_when(args: list[object], ready: Callable[[], bool]) -> int:
    """Start the CLI, SIGKILL it once ready() holds; its exit status."""
    proc = popen(*args)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.kill()
            break
        time.sleep(0.0005)
    proc.communicate()
    return proc.wait()


def assert_complete(dst: Path, expected: dict[str, str]) -> None:
    assert tree_digest(dst) == expected
    assert not (dst / ".rewriter").exists()


# --- 1. plan identity and resume through prune / soft-prune --------------------------------------

def test_same_inputs_make_the_same_plan_wherever_and_whenever(small, tmp_path):
    src, sal = small
    a = plan_file(src, sal, tmp_path / "a.json")
    time.sleep(1.1)  # a creation time in seconds would differ now
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(sal, tmp_path / "elsewhere" / "s.json")
    rewriter("plan", os.path.relpath(src, tmp_path), "--saliency", "elsewhere/s.json", "--keep-frac", "0.5",
             "--max-shard-size", "6MB", "--out", "b.json", cwd=tmp_path)
    pa, pb = Plan.load(str(a)), Plan.load(str(tmp_path / "b.json"))
    assert "created_utc" not in pa.provenance
    assert pa.provenance["saliency"][0]["path"] != pb.provenance["saliency"][0]["path"]
    assert pa.digest == pb.digest
    # An older plan carrying a creation time has the same identity as one without.
    doc = pa.to_json()
    doc["provenance"]["created_utc"] = "2020-01-01T00:00:00Z"
    assert Plan.from_json(doc).digest == pa.digest
    kept = doc["expert_mapping"]["0"]
    other = next(e for e in range(max(kept) + 2) if e not in kept)
    doc["expert_mapping"]["0"] = sorted([*kept[1:], other])
    assert Plan.from_json(doc).digest != pa.digest


@pytest.mark.parametrize("command", ["prune", "soft-prune"])
def test_killed_prune_resumes_with_the_same_command(small, tmp_path, command):
    src, sal = small
    before = source_digest(src)
    rewriter(*prune_args(src, sal, tmp_path / "ref", command))
    expected = tree_digest(tmp_path / "ref")
    moments = {
        "mid-shard": lambda d: any((d / ".rewriter" / "tmp").glob("*.part")),
        "after a shard": lambda d: journal_shards(d) >= 1,
        "finalizing": lambda d: (d / "config.json").exists(),
    }
    killed = 0
    for label, ready in moments.items():
        dst = tmp_path / label.replace(" ", "-")
        args = prune_args(src, sal, dst, command)
        status = kill_when([*args, "--no-zero-copy", "--buffer-mib", "1"], lambda r=ready, d=dst: r(d))
        killed += status == -signal.SIGKILL
        out = rewriter(*args).stdout
        assert "another plan" not in out
        assert_complete(dst, expected)
    assert killed >= 2, "the runs finished before they could be killed"
    assert source_digest(src) == before


def test_prune_with_several_jobs_killed_resumes_byte_identical(small, tmp_path):
    """Several shards in flight when killed: the journal vouches only for whole shards."""
    src, sal = small
    rewriter(*prune_args(src, sal, tmp_path / "ref"), "--jobs", "1")
    expected = tree_digest(tmp_path / "ref")
    moments = {
        "two parts": lambda d: len(list((d / ".rewriter" / "tmp").glob("*.part"))) >= 2,
        "after a shard": lambda d: journal_shards(d) >= 1,
    }
    killed = 0
    for label, ready in moments.items():
        dst = tmp_path / label.replace(" ", "-")
        args = [*prune_args(src, sal, dst), "--jobs", "4"]
        status = kill_when([*args, "--no-zero-copy", "--buffer-mib", "1"], lambda r=ready, d=dst: r(d))
        killed += status == -signal.SIGKILL
        rewriter(*args)
        assert_complete(dst, expected)
    assert killed >= 1, "the runs finished before they could be killed"


def at_file_operation(dst: Path, action: str, spec: str, args: list[object]) -> subprocess.CompletedProcess:
    """The real CLI that SIGKILLs itself (``kill``), fills its disk (``fill=PATH``) or records its
    file operations (``trace=FILE``) at the destination file operation ``spec`` names
    (:mod:`tests.file_events`): a moment of the run that does not depend on how fast it runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "tests.file_events", dst, action, spec, "--", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=120)


def file_operations(dst: Path, args: list[object]) -> list[str]:
    """The destination file operations of an uninterrupted run, in order (it writes ``dst``)."""
    trace = dst.with_name(dst.name + ".trace")
    r = at_file_operation(dst, f"trace={trace}", "-", args)
    assert r.returncode == 0, r.stderr
    return trace.read_text().splitlines()


def counted(ops: list[str]) -> list[str]:
    """Each operation as ``name#n`` (the n-th of its name), the stage that stops a run just before it."""
    seen: dict[str, int] = {}
    out = []
    for op in ops:
        seen[op] = seen.get(op, 0) + 1
        out.append(f"{op}#{seen[op]}")
    return out


def command_args(command: str, src: Path, sal: Path, plan: Path, dst: Path) -> list[object]:
    if command == "run":
        return ["run", plan, "--out", dst, "--quiet"]
    return prune_args(src, sal, dst, command)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "prune", "soft-prune"])
def test_killed_at_each_step_after_the_last_shard_the_same_command_ends_complete(small, tmp_path, command):
    """Killed before each file operation from the last journal entry on (status document, config,
    copied files, card, pruning.json, the index, each removal of the state folder), the same
    command ends with the output of an uninterrupted run and no state folder."""
    src, sal = small
    plan = plan_file(src, sal, tmp_path / "plan.json")  # for `run`
    ops = file_operations(tmp_path / "ref", command_args(command, src, sal, plan, tmp_path / "ref"))
    expected = tree_digest(tmp_path / "ref")
    shards = len([n for n in expected if n.endswith(".safetensors")])
    # The journal is written once when the run starts and once per shard; the last of these comes
    # after every shard, and what follows it is the same in every run.
    last = [i for i, op in enumerate(ops) if op == "rename:journal.json"][shards]
    anchor = f"rename:journal.json#{shards + 1}"
    moments = [anchor] + [f"{anchor}>{op}" for op in counted(ops[last + 1:])]
    for needed in ("rename:status.json#1", "rename:README.md#1", "rename:pruning.json#1",
                   "rename:model.safetensors.index.json#1", "remove:journal.json#1", "remove:lock#1",
                   "rmdir:.rewriter#1"):
        assert f"{anchor}>{needed}" in moments, (needed, ops[last:])
    published = moments.index(f"{anchor}>rename:model.safetensors.index.json#1")
    for i, moment in enumerate(moments):
        dst = tmp_path / f"d{i}"
        args = command_args(command, src, sal, plan, dst)
        killed = at_file_operation(dst, "kill", moment, args)
        assert killed.returncode == -signal.SIGKILL, (moment, killed.stderr)
        assert (dst / "model.safetensors.index.json").exists() == (i > published), moment
        rewriter(*args)
        assert_complete(dst, expected)


@pytest.mark.slow
def test_prune_killed_at_20_random_moments_resumes_byte_identical(small, tmp_path):
    """Killed just before 20 file operations of the run picked at random (seeded): a shard's
    temporary file made or published, the journal replaced, the output finalized...; the same
    command then ends byte-identical to an uninterrupted run."""
    src, sal = small
    args = lambda dst: [*prune_args(src, sal, dst), "--no-zero-copy", "--buffer-mib", "1"]  # noqa: E731
    ops = file_operations(tmp_path / "ref", args(tmp_path / "ref"))
    expected = tree_digest(tmp_path / "ref")
    assert len([n for n in expected if n.endswith(".safetensors")]) >= 5
    # How often the status document is rewritten depends on how long the run takes: the moments
    # are chosen among the other operations, whose count is the same in every run.
    moments = sorted(m for m in counted(ops) if "status.json" not in m)
    chosen = random.Random(12).sample(moments, 20)
    assert sum(".safetensors" in m for m in chosen) >= 3, "too few moments while shards are written"
    for i, moment in enumerate(chosen):
        dst = tmp_path / f"d{i}"
        killed = at_file_operation(dst, "kill", moment, args(dst))
        assert killed.returncode == -signal.SIGKILL, (moment, killed.stderr)
        rewriter(*args(dst))
        assert_complete(dst, expected)


def _mount_tmpfs(path: Path, options: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.fixture
def mounts(tmp_path):
    """Mount tmpfs folders under tmp_path; all unmounted afterwards."""
    made: list[Path] = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, options)
        made.append(path)
        return path

    yield mount
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("command", ["prune", "soft-prune"])
def test_prune_after_a_full_disk_resumes_once_space_is_freed(small, tmp_path, mounts, command):
    src, sal = small
    rewriter(*prune_args(src, sal, tmp_path / "ref", command))
    expected = tree_digest(tmp_path / "ref")
    disk = mounts("disk", "size=12m")
    before = source_digest(src)
    r = rewriter(*prune_args(src, sal, disk / "dst", command), expect=2)
    assert r.stderr.startswith("error: ") and "no space left" in r.stderr and "run the same command again" in r.stderr
    assert not (disk / "dst" / "model.safetensors.index.json").exists()
    assert not list((disk / "dst" / ".rewriter" / "tmp").glob("*.part"))
    subprocess.run(["mount", "-o", "remount,size=128m", str(disk)], check=True)
    out = rewriter(*prune_args(src, sal, disk / "dst", command)).stdout
    assert "resumed" in out and "(0 resumed)" not in out
    assert_complete(disk / "dst", expected)
    assert source_digest(src) == before


# --- 2. absolute URLs ----------------------------------------------------------------------------

def test_plan_and_pruning_json_work_from_any_folder(small, tmp_path):
    src, sal = small
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(src, work / "src")
    rewriter("plan", "src", "--saliency", sal, "--keep-frac", "0.5", "--out", "plan.json", cwd=work)
    plan = Plan.load(str(work / "plan.json"))
    assert plan.source_url == str(work / "src")
    rewriter("run", work / "plan.json", "--out", tmp_path / "x", "--quiet", cwd=Path("/"))
    prov = json.loads((tmp_path / "x" / "pruning.json").read_text())
    assert prov["source"] == "local:src"  # pruning.json is published: no path of this machine
    out = rewriter("verify", work / "src", tmp_path / "x", cwd=Path("/")).stdout
    assert out.rstrip().endswith("OK") and str(work / "src") in out


# --- 3. a plan is untrusted input -----------------------------------------------------------------

def _edit(doc: dict, how: str) -> None:
    out = doc["outputs"][0]
    seg = out["tensors"][0]["segments"][0]
    shard = next(iter(doc["source"]["shards"]))
    edits = {
        "output ..": lambda: out.update(name="../escaped.safetensors"),
        "output absolute": lambda: out.update(name="/tmp/escaped.safetensors"),
        "output backslash": lambda: out.update(name="..\\escaped.safetensors"),
        "output drive": lambda: out.update(name="C:escaped.safetensors"),
        "output empty": lambda: out.update(name=""),
        "output in a folder": lambda: out.update(name="sub/x.safetensors"),
        "output not safetensors": lambda: out.update(name="config.json"),
        "copied file ..": lambda: doc["copy_files"].append("../../etc/passwd"),
        "copied file over config": lambda: doc["copy_files"].append("config.json"),
        "copied file into state": lambda: doc["copy_files"].append(".rewriter/journal.json"),
        "source shard ..": lambda: doc["source"]["shards"].update({"../x.safetensors": doc["source"]["shards"][shard]}),
        "segment shard unknown": lambda: seg.__setitem__(0, "../../etc/passwd"),
        "segment offset negative": lambda: seg.__setitem__(1, -seg[1]),
        "segment offset a string": lambda: seg.__setitem__(1, str(seg[1])),
        "segment past the shard": lambda: seg.__setitem__(1, doc["source"]["shards"][seg[0]]["size"]),
        "segment in the header": lambda: seg.__setitem__(1, 0),
        "output size": lambda: out.update(size=out["size"] + 1),
        "source size negative": lambda: doc["source"]["shards"][shard].update(size=-1),
    }
    edits[how]()


BAD_PLANS = ["output ..", "output absolute", "output backslash", "output drive", "output empty",
             "output in a folder", "output not safetensors", "copied file ..", "copied file over config",
             "copied file into state", "source shard ..", "segment shard unknown", "segment offset negative",
             "segment offset a string", "segment past the shard", "segment in the header", "output size",
             "source size negative"]


@pytest.mark.parametrize("how", BAD_PLANS)
def test_plan_with_a_bad_name_or_number_is_refused(tiny, tiny_saliency, tmp_path, how):
    good = plan_file(tiny, tiny_saliency, tmp_path / "plan.json")
    doc = json.loads(good.read_text())
    _edit(doc, how)
    with pytest.raises(PlanError, match="bad.json"):
        Plan.from_json(doc, "bad.json")


def test_crafted_plan_writes_nothing_outside_the_destination(tiny, tiny_saliency, tmp_path):
    good = plan_file(tiny, tiny_saliency, tmp_path / "plan.json")
    doc = json.loads(good.read_text())
    _edit(doc, "output ..")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    area = tmp_path / "area"
    area.mkdir()
    before = source_digest(tiny)
    r = rewriter("run", bad, "--out", area / "dst", "--quiet", expect=2)
    assert r.stderr.count("\n") == 1 and str(bad) in r.stderr and "../escaped.safetensors" in r.stderr
    assert list(area.iterdir()) == []
    assert source_digest(tiny) == before
    rewriter("run", good, "--out", area / "dst", "--quiet")
    assert verify(str(tiny), str(area / "dst")).ok


# --- 4. one run per destination --------------------------------------------------------------------

def _stop_once_locked(args: list[object], dst: Path) -> subprocess.Popen:
    """Start a run and SIGSTOP it once it holds the destination's lock (and has said so)."""
    proc = popen(*args)
    lock = dst / LOCK_NAME
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.exists() and LockOwner.parse(lock.read_bytes()) is not None:
            proc.send_signal(signal.SIGSTOP)
            return proc
        time.sleep(0.0005)
    proc.kill()
    pytest.fail("the first run never held the lock")


@pytest.mark.parametrize("command", ["run", "prune"])
def test_second_concurrent_run_says_who_holds_the_destination(small, tmp_path, command):
    src, sal = small
    dst = tmp_path / "dst"
    if command == "run":
        args: list[object] = ["run", plan_file(src, sal, tmp_path / "plan.json"), "--out", dst, "--quiet"]
    else:
        args = prune_args(src, sal, dst)
    first = _stop_once_locked([*args, "--no-zero-copy", "--buffer-mib", "1"], dst)
    try:
        r = rewriter(*args, expect=LOCKED)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: destination")
        assert f"process {first.pid} on host" in r.stderr and "run the same command again" in r.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert verify(str(src), str(dst)).ok
    assert not (dst / ".rewriter").exists()


def test_refused_destination_is_left_as_it_was(tiny, tiny_saliency, tmp_path):
    plan = plan_file(tiny, tiny_saliency, tmp_path / "plan.json")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    r = rewriter("run", plan, "--out", busy, "--quiet", expect=2)
    assert "files this tool did not write" in r.stderr
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_lock_of_a_killed_run_does_not_block_the_next(small, tmp_path):
    src, sal = small
    dst = tmp_path / "dst"
    args = prune_args(src, sal, dst)
    first = _stop_once_locked([*args, "--no-zero-copy", "--buffer-mib", "1"], dst)
    first.kill()
    first.communicate()
    assert (dst / LOCK_NAME).exists()
    rewriter(*args)
    assert verify(str(src), str(dst)).ok


def _memory_plan(tiny, tiny_saliency, tmp_path) -> Plan:
    return Plan.load(str(plan_file(tiny, tiny_saliency, tmp_path / "plan.json")))


def test_object_store_lock_refuses_a_live_owner_and_takes_over_stale_ones(tiny, tiny_saliency, tmp_path):
    import fsspec

    from rewriter.exec.dest.lock import STALE_AFTER_S

    plan = _memory_plan(tiny, tiny_saliency, tmp_path)
    fs = fsspec.filesystem("memory")
    url = f"memory://lock-{tmp_path.name}"
    lock_path = f"{url}/{LOCK_NAME}"
    now = time.time()
    live = LockOwner("build-host-7", 4242, now - 60, now - 60, "t1")
    fs.pipe_file(lock_path, live.to_bytes())
    with pytest.raises(DestinationLockedError, match="process 4242 on host build-host-7"):
        execute(plan, url)
    assert LockOwner.parse(fs.cat_file(lock_path)) == live
    # Not refreshed for longer than the stale limit: taken over.
    old = now - STALE_AFTER_S - 10
    fs.pipe_file(lock_path, LockOwner("build-host-7", 4242, old, old, "t2").to_bytes())
    execute(plan, url)
    assert not fs.exists(lock_path) and verify(str(tiny), url).ok
    # This host, a process that has exited: taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    url2 = f"{url}-2"
    fs.pipe_file(f"{url2}/{LOCK_NAME}", LockOwner(socket.gethostname(), int(dead.stdout), now, now, "t3").to_bytes())
    execute(plan, url2)
    assert not fs.exists(f"{url2}/{LOCK_NAME}") and verify(str(tiny), url2).ok


@pytest.mark.ray
def test_ray_executor_honours_the_lock_and_digest(ray_cluster, small, tmp_path):
    from core.storage import Storage
    from rewriter.exec.dest.lock import DestinationLock
    from rewriter.exec.distributed.ray_executor import execute_on_ray

    src, sal = small
    plan = Plan.load(str(plan_file(src, sal, tmp_path / "plan.json")))
    dst = tmp_path / "dst"
    with DestinationLock(Storage(str(dst))):
        with pytest.raises(DestinationLockedError, match=f"process {os.getpid()}"):
            execute_on_ray(plan, str(dst), workers=2)
    assert not (dst / "model.safetensors.index.json").exists()
    # A plan made again (same inputs) resumes nothing new and finds the output complete.
    execute_on_ray(plan, str(dst), workers=2)
    again = Plan.load(str(plan_file(src, sal, tmp_path / "plan2.json")))
    assert execute_on_ray(again, str(dst), workers=2).already_complete
    assert not (dst / ".rewriter").exists()


# --- 5. unwritable destinations ---------------------------------------------------------------------

def test_read_only_destination_is_one_clear_error(tiny, tiny_saliency, tmp_path, mounts):
    plan = plan_file(tiny, tiny_saliency, tmp_path / "plan.json")
    ro = mounts("ro", "ro,size=1m")
    before = source_digest(tiny)
    r = rewriter("run", plan, "--out", ro / "dst", "--quiet", expect=2)
    assert r.stderr.count("\n") == 1 and "Read-only file system" in r.stderr and str(ro / "dst") in r.stderr
    r = rewriter("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", ro / "p.json", expect=2)
    assert r.stderr.count("\n") == 1 and str(ro / "p.json") in r.stderr and "--out" in r.stderr
    assert source_digest(tiny) == before
    subprocess.run(["mount", "-o", "remount,rw", str(ro)], check=True)
    assert list(ro.iterdir()) == []
    rewriter("run", plan, "--out", ro / "dst", "--quiet")
    assert verify(str(tiny), str(ro / "dst")).ok


def test_folder_without_write_permission(tiny, tiny_saliency):
    """Run as an unprivileged user (root writes into any folder whatever its mode)."""
    work = Path(tempfile.mkdtemp(prefix="rewriter-perm-"))
    try:
        work.chmod(0o755)
        shutil.copytree(tiny, work / "src")
        plan = plan_file(work / "src", tiny_saliency, work / "plan.json")
        plan.chmod(0o644)
        locked = work / "locked"
        locked.mkdir(mode=0o555)
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        r = subprocess.run([*as_user, sys.executable, "-m", "rewriter.cli", "run", str(plan), "--out",
                            str(locked / "dst"), "--quiet"], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("error: ") and "Permission denied" in r.stderr, r.stderr
        assert list(locked.iterdir()) == []
        locked.chmod(0o755)
        rewriter("run", plan, "--out", locked / "dst", "--quiet")
        assert verify(str(tiny), str(locked / "dst")).ok
    finally:
        shutil.rmtree(work)


def test_destination_that_is_a_file_or_below_one(tiny, tiny_saliency, tmp_path):
    plan = plan_file(tiny, tiny_saliency, tmp_path / "plan.json")
    f = tmp_path / "file"
    f.write_text("precious")
    before = source_digest(tiny)
    for extra in ([], ["--force"]):
        r = rewriter("run", plan, "--out", f, "--quiet", *extra, expect=2)
        assert r.stderr.count("\n") == 1 and "is a file, not a folder" in r.stderr
    r = rewriter("run", plan, "--out", f / "sub", "--quiet", expect=2)
    assert f"lies below {f}, which is a file" in r.stderr
    assert f.read_text() == "precious" and source_digest(tiny) == before
    f.unlink()
    rewriter("run", plan, "--out", f, "--quiet")
    assert verify(str(tiny), str(f)).ok


# --- 6. a failing commit shows its own error and leaves no temporary file ---------------------------

@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failing_commit_shows_the_real_error_and_leaves_no_part(tiny, tiny_saliency, tmp_path, monkeypatch, failure):
    # A full disk that shows only at fsync (and a Ctrl-C arriving then) cannot be produced on
    # demand by a real filesystem here: fsync is made to fail; everything else is real.
    plan = Plan.load(str(plan_file(tiny, tiny_saliency, tmp_path / "plan.json")))
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".part"):
            raise failure
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    dst = tmp_path / "dst"
    before = source_digest(tiny)
    expected = ExecutionError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        execute(plan, str(dst))
    if expected is ExecutionError:
        assert "no space left" in str(info.value) and "Bad file descriptor" not in str(info.value)
    assert not list(dst.rglob("*.part"))
    assert source_digest(tiny) == before
    monkeypatch.setattr(os, "fsync", real_fsync)
    execute(plan, str(dst))
    assert verify(str(tiny), str(dst)).ok


@pytest.mark.s3
def test_failed_multipart_abort_is_logged(s3, caplog):
    from rewriter.exec.dest.destination import open_destination

    s3.make_bucket("aborts")
    dst = open_destination("s3://aborts/x", s3.options)
    with caplog.at_level("WARNING", logger="rewriter.exec.dest.destination"):
        dst.abort_parts("model.safetensors", "no-such-upload")
    assert any("could not abort multipart upload no-such-upload" in r.getMessage() for r in caplog.records)


# --- 7. messages that point to the fix -------------------------------------------------------------

def test_checkpoint_file_or_hub_cache_folder_as_source(tiny, tiny_saliency, tmp_path):
    shard = sorted(tiny.glob("model-*.safetensors"))[0]
    r = rewriter("plan", shard, "--saliency", tiny_saliency, "--keep-frac", "0.5", expect=2)
    assert r.stderr.count("\n") == 1 and "is a file" in r.stderr and f"pass {tiny}" in r.stderr
    cache = tmp_path / "models--openai--tiny"
    shutil.copytree(tiny, cache / "snapshots" / "0123abc")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0123abc")
    r = rewriter("plan", cache, "--saliency", tiny_saliency, "--keep-frac", "0.5", expect=2)
    assert "Hugging Face cache folder" in r.stderr and "snapshots/<revision>" in r.stderr and "0123abc" in r.stderr
    rewriter("plan", cache / "snapshots" / "0123abc", "--saliency", tiny_saliency, "--keep-frac", "0.5")


def test_verify_against_another_source_names_both(tiny, tiny_saliency, tmp_path):
    import dataclasses

    plan = plan_file(tiny, tiny_saliency, tmp_path / "plan.json")
    rewriter("run", plan, "--out", tmp_path / "dst", "--quiet")
    other = tmp_path / "other"
    write_checkpoint(other, dataclasses.replace(PRESETS["tiny"], vocab=320))
    r = rewriter("verify", other, tmp_path / "dst", expect=2)
    assert r.stderr.count("\n") == 1 and not r.stdout
    assert (f"{other} is not the source of {tmp_path / 'dst'}: that was made from a local folder named "
            f"'{tiny.name}'") in r.stderr
    assert "changed since" not in r.stderr


def test_nonuniform_keep_list_on_mixtral_does_not_speak_of_gpt_oss(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "mixtral"
    src.mkdir()
    h, e = 8, 4
    tensors = {"model.embed_tokens.weight": np.zeros((16, h), np.float32)}
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe."
        tensors[p + "gate.weight"] = np.zeros((e, h), np.float32)
        for x in range(e):
            for w in ("w1", "w2", "w3"):
                tensors[f"{p}experts.{x}.{w}.weight"] = np.zeros((h, h), np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_hidden_layers": 2,
        "num_local_experts": e, "num_experts_per_tok": 2, "hidden_size": h}))
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"0": [0, 1, 2], "1": [0, 1]}))
    r = rewriter("plan", src, "--keep-list", keep, expect=None)
    assert r.returncode == 2 and "gpt-oss" not in r.stderr and "one expert count for all layers" in r.stderr


# --- 8. output file modes ------------------------------------------------------------------------------

def test_output_files_are_0644(tiny, tiny_saliency, tmp_path):
    old = os.umask(0)  # the modes the tool asks for, unmasked
    try:
        args = ["prune", tiny, tmp_path / "dst", "--saliency", tiny_saliency, "--keep-frac", "0.5",
                "--max-shard-size", "60KB", "--quiet"]
        rewriter(*args)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "dst").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.json", "model.safetensors.index.json", "pruning.json", "tokenizer.json"}
    assert len([p for p in files if p.suffix == ".safetensors"]) > 1
    assert {p.relative_to(tmp_path): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(tmp_path): "0o644" for p in files}


# --- 9. verify closes what it opened ---------------------------------------------------------------

def test_failing_verify_leaves_no_open_files(tiny, tiny_saliency, tmp_path):
    import dataclasses

    import psutil

    plan = plan_file(tiny, tiny_saliency, tmp_path / "p.json")
    rewriter("run", plan, "--out", tmp_path / "dst", "--quiet")
    other = tmp_path / "other"
    write_checkpoint(other, dataclasses.replace(PRESETS["tiny"], vocab=128))
    me = psutil.Process()
    before = me.num_fds()
    with pytest.raises(PlanError, match="is not the source of"):
        verify(str(other), str(tmp_path / "dst"))
    assert me.num_fds() == before
    # The planned source itself, its shards then made smaller: the planned ranges run past their
    # ends mid-verify.
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    plan2 = plan_file(src, tiny_saliency, tmp_path / "p2.json")
    rewriter("run", plan2, "--out", tmp_path / "dst2", "--quiet")
    shutil.rmtree(src)
    write_checkpoint(src, dataclasses.replace(PRESETS["tiny"], vocab=128))
    before = me.num_fds()
    with pytest.raises(CheckpointError, match="truncated or changed"):
        verify(str(src), str(tmp_path / "dst2"))
    assert me.num_fds() == before
    (tmp_path / "dst" / "pruning.json").write_text("{not json")
    with pytest.raises(PlanError):
        verify(str(tiny), str(tmp_path / "dst"))
    assert me.num_fds() == before
