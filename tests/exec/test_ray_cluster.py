"""`run --ray` on a real multi-node Ray cluster started on this machine with `ray start`: a head
and two worker nodes (own temp dirs, 1 CPU each), one of them in a private mount namespace where
a tmpfs hides one folder (a node that cannot see a destination there). Drivers are `rewriter`
processes, killed and stopped with real signals; nodes are stopped by killing their processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planners.plan import Plan
from rewriter.exec.run.executor import execute
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import REPO, cli, tree_digest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = Path(sys.executable).with_name("ray")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """Nodes started with `ray start --block` in their own process groups; stopped by signalling
    those groups (never a global `ray stop`: other clusters may run on this machine)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.names: dict[str, str] = {}  # node id -> node name
        self.hidden = root / "hidden"  # invisible to the node started with private=True
        self.hidden.mkdir()
        #: Whether nodes can get a private mount namespace here (root and ``unshare -m``).
        self.private_namespaces = _can_unshare_mounts()

    def start(self, name: str, private: bool = False) -> None:
        args = [str(RAY), "start", "--num-cpus", "1", "--temp-dir", str(self.root / name), "--object-store-memory",
                str(80 << 20), "--node-ip-address", "127.0.0.1", "--block"]
        args += ["--head", "--port", str(self.port), "--include-dashboard=false"] if name == "head" else \
            ["--address", self.address]
        if private:
            args = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    f"mount -t tmpfs tmpfs {self.hidden} && exec {' '.join(args)}"]
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the node's life
        self.nodes[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)

    def wait_for(self, n: int) -> dict[str, str]:
        """Wait until ``n`` nodes are alive; node id -> name of the node (from its temp dir)."""
        code = ("import json, sys, time, ray\nray.init(address=sys.argv[1], logging_level='ERROR')\n"
                "t = time.time()\nwhile len([x for x in ray.nodes() if x['Alive']]) < int(sys.argv[2]) and time.time() - t < 90:\n"
                "    time.sleep(0.5)\nprint(json.dumps({x['NodeID']: x['ObjectStoreSocketName'] for x in ray.nodes() if x['Alive']}))")
        out = subprocess.run([sys.executable, "-c", code, self.address, str(n)], env=ENV, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        nodes = json.loads(out.strip().splitlines()[-1])
        assert len(nodes) >= n, nodes
        return {nid: Path(sock).relative_to(self.root).parts[0] for nid, sock in nodes.items()}

    def stop(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.nodes.pop(name)
        if sig == signal.SIGKILL:  # a lost node: its raylet and every worker it started, at once
            for pid in _descendants(proc.pid):
                with _suppress():
                    os.kill(pid, sig)
        with _suppress():
            os.killpg(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (workers)

    def close(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                self.stop(name, signal.SIGTERM)


def _can_unshare_mounts() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


def _descendants(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        found += kids
        todo += kids
    return found


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is ProcessLookupError


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not RAY.exists():
        pytest.skip("needs the ray CLI")
    c = Cluster(tmp_path_factory.mktemp("cluster", numbered=True))
    try:
        c.start("head")
        c.wait_for(1)
        c.start("w1")
        c.start("w2", private=c.private_namespaces)
        c.names = c.wait_for(3)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def one_shard_plan(tmp_path_factory):
    """The small preset pruned to one 39 MiB shard (eight 5 MiB parts), and the local run's files."""
    root = tmp_path_factory.mktemp("plan")
    write_checkpoint(root / "src", PRESETS["small"])
    synthetic_saliency(4, 32, 4, seed=3).save(root / "s.json")
    cli("plan", root / "src", "--saliency", root / "s.json", "--keep-frac", "0.5", "--max-shard-size", "100MB",
        "--out", root / "plan.json")
    execute(Plan.load(str(root / "plan.json")), str(root / "local"))
    return root / "plan.json", tree_digest(root / "local")


def rewriter(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rewriter.cli", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_args(cluster: Cluster, plan: Path, dst: object, *extra: object) -> list[object]:
    return ["run", plan, "--out", dst, "--ray", "--address", cluster.address, "--quiet", *extra]


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def parts_done(dst: Path) -> int:
    try:
        doc = json.loads((dst / ".rewriter" / "parts.json").read_text())
        return sum(len(s["parts"]) for s in doc["shards"].values())
    except (OSError, ValueError, KeyError):
        return 0


def test_a_node_that_cannot_see_the_destination_is_refused_before_any_write(cluster, one_shard_plan):
    if not cluster.private_namespaces:
        pytest.skip("unshare -m is not permitted here: no node can have its own view of the filesystem")
    plan, _ = one_shard_plan
    dst = cluster.hidden / "dst"
    private = next(nid for nid, name in cluster.names.items() if name == "w2")
    code, out = finish(rewriter(*run_args(cluster, plan, dst, "--workers", "3", "--part-mib", "5")))
    assert code == 2, out
    assert f"node id {private[:12]}" in out and "does not see the destination" in out and "no shard was written" in out
    assert [p.name for p in dst.iterdir() if not p.name.startswith(".")] == []
    assert not list(dst.rglob("*.parts")) and not list(dst.rglob("*.safetensors"))


def test_a_second_driver_on_the_same_destination_refuses(cluster, one_shard_plan, tmp_path):
    plan, expected = one_shard_plan
    dst = tmp_path / "dst"
    first = rewriter(*run_args(cluster, plan, dst, "--workers", "2", "--part-mib", "5"))
    lock = dst / ".rewriter" / "lock"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and first.poll() is None:
        if lock.exists() and f'"pid": {first.pid}' in lock.read_text(errors="replace"):
            break
        time.sleep(0.001)
    os.kill(first.pid, signal.SIGSTOP)  # the first driver holds the lock, its writes part done
    try:
        code, out = finish(rewriter(*run_args(cluster, plan, dst, "--workers", "2", "--part-mib", "5")), 120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert code == 75, out
    assert f"is in use: process {first.pid}" in out
    code, out = finish(first)
    assert code == 0, out
    assert {k: v for k, v in tree_digest(dst).items() if k != "pruning.json"} == \
        {k: v for k, v in expected.items() if k != "pruning.json"}
    assert "-> OK" in cli("verify", one_shard_plan[0].parent / "src", dst)


def test_a_killed_driver_resumes_part_by_part(cluster, one_shard_plan, tmp_path):
    plan, expected = one_shard_plan
    dst = tmp_path / "dst"
    args = run_args(cluster, plan, dst, "--workers", "2", "--part-mib", "5", "--buffer-mib", "1", "--no-zero-copy")
    proc = rewriter(*args)
    while proc.poll() is None and parts_done(dst) == 0:
        time.sleep(0.0005)
    proc.kill()
    proc.wait()
    kept = parts_done(dst)
    assert 0 < kept < 8 and not (dst / "model.safetensors.index.json").exists()
    assert list((dst / ".rewriter" / "parts").iterdir())  # the killed run's part file stays for the next
    code, out = finish(rewriter(*args[:-1], "--json"))
    assert code == 0, out
    shard = json.loads(out[out.index("{"):])["shards"][0]
    assert sum(p["resumed"] for p in shard["parts"]) == kept  # checked by hash, not written again
    assert {k: v for k, v in tree_digest(dst).items() if k != "pruning.json"} == \
        {k: v for k, v in expected.items() if k != "pruning.json"}
    assert not (dst / ".rewriter").exists()  # no temporaries, part files or journals left
    assert "-> OK" in cli("verify", one_shard_plan[0].parent / "src", dst)


def _part_journaled(dst: Path) -> bool:
    try:
        return '"start"' in (dst / ".rewriter" / "parts.json").read_text()
    except OSError:
        return False


def test_status_after_cleanup_counts_no_discarded_part(cluster, one_shard_plan, tmp_path):
    plan, _ = one_shard_plan
    # The driver is frozen as soon as it has journaled a part, so it cannot publish the shard
    # before it is killed; on a machine fast enough to publish it first, the run is tried again.
    for attempt in range(5):
        dst = tmp_path / f"dst{attempt}"
        proc = rewriter(*run_args(cluster, plan, dst, "--workers", "2", "--part-mib", "5", "--buffer-mib", "1",
                                  "--no-zero-copy"))
        while proc.poll() is None and not _part_journaled(dst):
            time.sleep(0.0005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGSTOP)
        proc.kill()
        proc.wait()
        before = cli("status", dst, expect=1)
        if "shards:     0 of 1" in before:
            break
    else:
        pytest.fail("each of 5 runs published its shard before its driver was stopped: no part to discard")
    assert "state:      stopped" in before, before
    assert "removed" in cli("cleanup", dst)
    after = cli("status", dst, expect=1)
    assert "parts:" not in after and "shards:     0 of 1" in after and "bytes:      0 B of" in after, after
    assert "discarded the parts" in after, after


@pytest.mark.s3
def test_a_killed_driver_on_s3_leaves_no_open_upload(cluster, one_shard_plan, s3):
    plan, expected = one_shard_plan
    s3.make_bucket("killed")
    dst = "s3://killed/out"
    opts = ["--dst-options", json.dumps(s3.options)]
    args = run_args(cluster, plan, dst, "--workers", "2", "--part-mib", "5", "--buffer-mib", "1", *opts)
    fs = s3.fs()
    proc = rewriter(*args)
    while proc.poll() is None and not (fs.invalidate_cache() or fs.exists("killed/out/.rewriter/parts.json")
                                       and '"start"' in fs.cat_file("killed/out/.rewriter/parts.json").decode()):
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    uploads = fs.call_s3("list_multipart_uploads", Bucket="killed").get("Uploads", [])
    assert uploads  # what the killed driver left open
    listed = cli("cleanup", dst, *opts, "--dry-run")
    assert all(f"would abort multipart upload {u['UploadId']}" in listed for u in uploads)
    code, out = finish(rewriter(*args, "--json"))  # resumes: reuses the journaled upload
    assert code == 0, out
    shard = json.loads(out[out.index("{"):])["shards"][0]
    assert any(p["resumed"] for p in shard["parts"])
    assert not fs.call_s3("list_multipart_uploads", Bucket="killed").get("Uploads")
    assert "-> OK" in cli("verify", one_shard_plan[0].parent / "src", dst, *opts)
    import hashlib

    name = next(k for k in expected if k.endswith(".safetensors"))
    assert hashlib.sha256(fs.cat_file(f"killed/out/{name}")).hexdigest() == expected[name]


def test_a_node_stopped_mid_run_with_spare_capacity_elsewhere(cluster, one_shard_plan, tmp_path):
    """Runs last: it kills a worker node that hosts an actor (started again afterwards)."""
    plan, expected = one_shard_plan
    dst = tmp_path / "dst"
    proc = rewriter(*run_args(cluster, plan, dst, "--workers", "2", "--part-mib", "5", "--buffer-mib", "1",
                              "--no-zero-copy"))
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        probes = dst / ".rewriter" / "probe"
        nodes = {p.read_text() for p in probes.glob("*.*")} if probes.exists() else set()
        # Two actors on three 1-CPU nodes: at least one is on a worker node.
        victim = next((cluster.names[n] for n in nodes if cluster.names.get(n, "head") != "head"), None)
        time.sleep(0.01)
    assert victim is not None, "no actor was placed on a worker node"
    try:
        while proc.poll() is None and parts_done(dst) == 0:
            time.sleep(0.001)
        assert proc.poll() is None
        cluster.stop(victim)  # SIGKILL of the node's raylet and workers: a lost node
        code, out = finish(proc)
    finally:
        cluster.start(victim, private=victim == "w2")
    assert code == 0, out
    assert "died" in out and "retrying (1 of 3)" in out, out  # the lost node's task, taken by another actor
    assert {k: v for k, v in tree_digest(dst).items() if k != "pruning.json"} == \
        {k: v for k, v in expected.items() if k != "pruning.json"}
    assert "-> OK" in cli("verify", one_shard_plan[0].parent / "src", dst)
