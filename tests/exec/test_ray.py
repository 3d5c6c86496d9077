"""The Ray executor on a real local Ray cluster (2 CPUs, shared by these tests)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time

import pytest

from core.errors import ExecutionError
from planners.plan import Plan
from rewriter.exec.run.executor import execute
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import cli, tree_digest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def medium_plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    src = root / "src"
    write_checkpoint(src, PRESETS["small"])
    synthetic_saliency(4, 32, 4, seed=3).save(root / "s.json")
    cli("plan", src, "--saliency", root / "s.json", "--keep-frac", "0.5", "--max-shard-size", "12MB",
        "--out", root / "plan.json")
    plan = Plan.load(str(root / "plan.json"))
    execute(plan, str(root / "local"))
    return src, plan, tree_digest(root / "local")


def test_ray_matches_local_byte_for_byte(ray_cluster, medium_plan, tmp_path):
    from rewriter.exec.distributed.ray_executor import execute_on_ray

    _, plan, expected = medium_plan
    seen = []
    result = execute_on_ray(plan, str(tmp_path / "whole"), workers=2, progress=seen.append)
    assert tree_digest(tmp_path / "whole") == expected
    assert sum(seen) <= plan.total_size + sum(len(o.header) for o in plan.outputs)
    assert result.bytes_read == plan.total_size
    # Large shards split into parts written by positioned writes on several actors; the status
    # document counts the parts as they come in.
    from rewriter.exec.dest.runstatus import StatusWriter, format_status

    status = StatusWriter(every_s=0)
    counts: list[tuple[int, int]] = []
    parts_seen = status.parts
    status.parts = lambda done, total: (counts.append((done, total)), parts_seen(done, total))  # type: ignore[method-assign]
    execute_on_ray(plan, str(tmp_path / "parts"), workers=2, part_bytes=5 << 20, observer=status)
    assert _same_but_records(tmp_path / "parts", expected, plan, 5 << 20)
    total = sum(-(-o.size // (5 << 20)) for o in plan.outputs if o.size > 5 << 20)
    assert counts[0] == (0, total) and counts[-1] == (total, total)
    assert [d for d, _ in counts] == list(range(total + 1))
    assert f"parts:      {total} of {total} (of the shards written in parts)" in format_status(status.doc)


def _same_but_records(dst, expected, plan, part_bytes):
    """The files equal the local run's; ``pruning.json`` records shards larger than ``part_bytes``
    as their parts' sha256 (checked against the bytes) and the others whole."""
    import hashlib
    import json

    got = tree_digest(dst)
    assert {k: v for k, v in got.items() if k != "pruning.json"} == {k: v for k, v in expected.items() if k != "pruning.json"}
    shards = json.loads((dst / "pruning.json").read_text())["shards"]
    for o in plan.outputs:
        rec = shards[o.name]
        if o.size > part_bytes:
            data = (dst / o.name).read_bytes()
            assert [(p["start"], p["length"]) for p in rec["parts"]] == [(s, min(part_bytes, o.size - s)) for s in range(0, o.size, part_bytes)]
            assert all(hashlib.sha256(data[p["start"]:p["start"] + p["length"]]).hexdigest() == p["sha256"] for p in rec["parts"])
        else:
            assert rec["sha256"] == expected[o.name]
    return True


def test_cli_ray_flag(ray_cluster, medium_plan, tmp_path):
    src, plan, expected = medium_plan
    plan.save(str(tmp_path / "p.json"))
    out = cli("run", tmp_path / "p.json", "--out", tmp_path / "dst", "--ray", "--workers", "2", "--quiet")
    assert "wrote" in out
    assert tree_digest(tmp_path / "dst") == expected


def test_job_entry_point_is_the_run_command(ray_cluster, medium_plan, tmp_path, capsys):
    """`python -m ray_jobs.rewrite` is `rewriter run --ray`: same options, defaults and output."""
    from ray_jobs.rewrite import main as job

    _, plan, expected = medium_plan
    plan.save(str(tmp_path / "p.json"))
    with pytest.raises(SystemExit) as e:
        job([str(tmp_path / "p.json"), "--out", str(tmp_path / "dst"), "--workers", "2", "--quiet"])
    assert e.value.code == 0, capsys.readouterr()
    assert "wrote" in capsys.readouterr().out
    assert tree_digest(tmp_path / "dst") == expected
    with pytest.raises(SystemExit):
        job(["--help"])
    job_help = capsys.readouterr().out
    run_help = cli("run", "--help")
    assert job_help.startswith("Usage: python -m ray_jobs.rewrite [OPTIONS] PLAN")
    def options(text: str) -> str:
        return " ".join(text.split("Options:")[1].split())  # line wrapping depends on the width

    assert options(job_help) == options(run_help)  # same options, help and defaults
    assert "Ray actors. [default: 2; x>=1]" in options(job_help)


def test_killed_worker_is_retried_and_output_identical(ray_cluster, medium_plan, tmp_path):
    from rewriter.exec.distributed.ray_executor import execute_on_ray

    _, plan, expected = medium_plan
    dst = tmp_path / "dst"
    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for p in (dst / ".rewriter" / "tmp").glob("*.part"):
                pid = int(p.name.split(".")[-3])
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    continue
                return
            time.sleep(0.0005)

    t = threading.Thread(target=killer)
    t.start()
    seen: list[int] = []
    execute_on_ray(plan, str(dst), workers=2, buffer_bytes=1 << 20, zero_copy=False, progress=seen.append)
    t.join()
    assert killed, "no worker was caught mid-shard"
    assert tree_digest(dst) == expected
    # Progress comes from polling the actors: a dead one costs the run nothing.
    assert plan.total_size <= sum(seen) <= plan.total_size + sum(o.size for o in plan.outputs)


def test_application_errors_surface_unwrapped(ray_cluster, tmp_path):
    from rewriter.exec.distributed.ray_executor import execute_on_ray

    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["tiny"])
    synthetic_saliency(2, 8, 2).save(tmp_path / "s.json")
    cli("plan", src, "--saliency", tmp_path / "s.json", "--keep-n", "4", "--out", tmp_path / "p.json")
    plan = Plan.load(str(tmp_path / "p.json"))
    # A segment that runs past the end of its source shard: the actor's copy fails. (A plan file
    # saying so is refused when read or run, so the plan is changed in memory, where it is no
    # longer the file's plan: origin None.)
    out = plan.outputs[0]
    t = out.tensors[-1]
    seg = t.segments[-1]
    seg = dataclasses.replace(seg, offset=plan.source_shards[seg.shard]["size"] - seg.length // 2)
    t = dataclasses.replace(t, segments=(*t.segments[:-1], seg))
    plan = dataclasses.replace(plan, outputs=(dataclasses.replace(out, tensors=(*out.tensors[:-1], t)), *plan.outputs[1:]),
                               origin=None)
    t0 = time.monotonic()
    with pytest.raises(ExecutionError, match="ends at byte") as e:
        execute_on_ray(plan, str(tmp_path / "dst"), workers=1, zero_copy=False)
    assert seg.shard in str(e.value)
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "dst" / "model.safetensors.index.json").exists()


@pytest.mark.s3
def test_ray_to_s3_in_multipart_parts(ray_cluster, s3, medium_plan, tmp_path):
    """Shards larger than the part size go up as one multipart upload whose parts several actors
    send; the objects equal the local run's files."""
    import hashlib

    from rewriter.exec.distributed.parts import split_parts
    from rewriter.exec.distributed.ray_executor import execute_on_ray
    from rewriter.exec.publish.verify import verify

    src, plan, expected = medium_plan
    assert any(len(split_parts(o, 5 << 20)) > 1 for o in plan.outputs)
    s3.make_bucket("ray-parts")
    execute_on_ray(plan, "s3://ray-parts/pruned", workers=2, part_bytes=5 << 20, dst_options=s3.options)
    fs = s3.fs()
    for name, digest in expected.items():
        if name != "pruning.json":  # records the shards in parts as their parts' hashes
            assert hashlib.sha256(fs.cat_file(f"ray-parts/pruned/{name}")).hexdigest() == digest, name
    assert verify(str(src), "s3://ray-parts/pruned", dst_options=s3.options).ok
    assert not fs.call_s3("list_multipart_uploads", Bucket="ray-parts").get("Uploads")


def _until_no_cpu_is_reported_free(within_s: float = 60) -> None:
    """Wait until Ray's resource figures (those the pending-actor messages report) show every CPU taken."""
    from ray._private.state import available_resources_per_node

    deadline = time.monotonic() + within_s
    while any(r.get("CPU", 0) for r in available_resources_per_node().values()):
        assert time.monotonic() < deadline, f"Ray still reports free CPU: {available_resources_per_node()}"
        time.sleep(0.05)


def _blockers(ray, n):
    """``n`` real actors holding one CPU each of the 2-CPU test cluster."""
    blocker = ray.remote(num_cpus=1)(type("Blocker", (), {"ready": lambda self: True}))
    actors = [blocker.remote() for _ in range(n)]
    ray.get([a.ready.remote() for a in actors])
    return actors


def test_actors_that_cannot_be_placed_are_reported_and_given_up(ray_cluster, medium_plan, tmp_path, caplog):
    from rewriter.exec.distributed.ray_executor import execute_on_ray

    _, plan, expected = medium_plan
    held = _blockers(ray_cluster, 1)
    try:
        # Two actors asked for, one CPU free: the placed one does all the work.
        with caplog.at_level("WARNING", logger="rewriter.exec.distributed.ray_driver"):
            t0 = time.monotonic()
            execute_on_ray(plan, str(tmp_path / "one"), workers=2, pending_timeout_s=3)
            elapsed = time.monotonic() - t0
        assert tree_digest(tmp_path / "one") == expected
        said = " ".join(r.getMessage() for r in caplog.records)
        # The wait is reported after 1 s and the unplaced actor given up after 3 s: a run that
        # outlasts those by far must have said so (a fast machine may finish first with one actor).
        if elapsed > 7:
            assert "waiting" in said and "for 1 of 2 Ray actors to be placed" in said and "--ray-pending-timeout" in said
            assert "the most free on any one of them" in said
        if elapsed > 11:
            assert "gave up a Ray actor not placed within 3 s; 1 running actors take its work" in said
        held += _blockers(ray_cluster, 1)
        # Ray's resource figures trail its nodes: the blocker is placed before they show its CPU
        # taken. The message reports those figures, so the run starts once they do.
        _until_no_cpu_is_reported_free()
        # No CPU free at all: a clear error after the timeout, nothing written.
        t0 = time.monotonic()
        with pytest.raises(ExecutionError, match=r"no Ray actor could be placed within 2 s: 1 actors each need 1 CPU") as e:
            execute_on_ray(plan, str(tmp_path / "none"), workers=1, pending_timeout_s=2)
        # An actor is placed on one node: the message says what the freest node has, not a sum.
        assert re.search(r"MiB of memory on one node, and the cluster has 1 node, the most free on any one of them "
                         r"0 CPU and \d+ MiB \(as Ray last reported them\); lower --workers", str(e.value)), str(e.value)
        assert time.monotonic() - t0 < 600  # it gives up (only a hang, not a slow machine, fails this)
        assert not list((tmp_path / "none").glob("*.safetensors"))
    finally:
        for a in held:
            ray_cluster.kill(a)


def test_a_worker_that_dies_too_often_loses_no_finished_shard(ray_cluster, medium_plan, tmp_path):
    """The error names the shard and how often its worker really died; finished shards stay
    journaled and the same run resumes them."""
    import json

    from rewriter.exec.distributed.ray_executor import execute_on_ray

    _, plan, expected = medium_plan
    dst = tmp_path / "dst"
    killed = _kill_a_writer_when_seen(dst)
    with pytest.raises(ExecutionError, match=r"the Ray worker writing it died 1 time \(last on node ") as e:
        execute_on_ray(plan, str(dst), workers=2, buffer_bytes=1 << 20, zero_copy=False, max_task_retries=0)
    killed.join()
    assert str(e.value).startswith("shard model-") and "run the same command again to resume" in str(e.value)
    assert not list((dst / ".rewriter" / "tmp").glob("*.part"))  # the dead attempt's temporary is gone
    finished = json.loads((dst / ".rewriter" / "journal.json").read_text())["shards"]
    result = execute_on_ray(plan, str(dst), workers=2)
    assert sorted(s.name for s in result.shards if s.resumed) == sorted(finished)
    assert tree_digest(dst) == expected


def _kill_a_writer_when_seen(dst):
    """A thread that SIGKILLs the first actor seen writing a shard (its temporary names its pid)."""
    def killer():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for p in (dst / ".rewriter" / "tmp").glob("*.part"):
                try:
                    os.kill(int(p.name.split(".")[-3]), signal.SIGKILL)
                    return
                except ProcessLookupError:
                    continue
            time.sleep(0.0005)

    t = threading.Thread(target=killer)
    t.start()
    return t


@pytest.fixture(scope="module")
def large_shard_plan(tmp_path_factory):
    """One output shard of about 200 MB: written in 64 MiB upload parts with --part-mib 128, whole
    through s3fs with --part-mib 256 and the default."""
    from rewriter.tools.synth import Geometry

    root = tmp_path_factory.mktemp("large")
    write_checkpoint(root / "src", Geometry(1, 32, 4, 2048, 2048, 4096, 8, 2, 64, 400_000_000))
    synthetic_saliency(1, 32, 4, seed=3).save(root / "s.json")
    cli("plan", root / "src", "--saliency", root / "s.json", "--keep-frac", "1", "--max-shard-size", "400MB",
        "--out", root / "plan.json")
    return Plan.load(str(root / "plan.json"))


@pytest.mark.s3
def test_actors_stay_within_the_memory_they_declare(ray_cluster, s3, medium_plan, large_shard_plan, tmp_path):
    """Peak RSS (VmHWM) of every actor, local and S3 paths, against what it declared to Ray."""
    from core.storage import Storage
    from rewriter.exec.dest.destination import open_destination
    from rewriter.exec.distributed.ray_actors import actor_memory_bytes
    from rewriter.exec.distributed.ray_executor import execute_on_ray

    _, plan, _ = medium_plan
    s3.make_bucket("memory")
    for url, opts in ((str(tmp_path / "local"), {}), ("s3://memory/out", s3.options)):
        for part_bytes in (5 << 20, 1 << 30):
            dst = f"{url}-{part_bytes}"
            result = execute_on_ray(plan, dst, workers=2, part_bytes=part_bytes, dst_options=opts)
            peak = max(s.peak_rss_bytes for s in result.shards)
            declared = actor_memory_bytes(open_destination(dst, opts), Storage(plan.source_url), 16 << 20,
                                          min(part_bytes, 64 << 20))
            print(f"{url.split(':')[0]} part {part_bytes >> 20} MiB: actor peak RSS {peak / 2**20:.0f} MiB, "
                  f"declared {declared / 2**20:.0f} MiB")
            assert 0 < peak < declared
    # A shard larger than the upload part: parts of 64 MiB sent from one buffer, or the whole
    # shard through s3fs's blocks.
    from rewriter.exec.options import DEFAULT_PART_BYTES

    big = max(large_shard_plan.outputs, key=lambda o: o.size)
    assert 128 << 20 < big.size < 256 << 20
    for part_bytes in (128 << 20, 256 << 20, DEFAULT_PART_BYTES):
        dst = f"s3://memory/large-{part_bytes >> 20}"
        result = execute_on_ray(large_shard_plan, dst, workers=2, part_bytes=part_bytes, dst_options=s3.options)
        peak = max(s.peak_rss_bytes for s in result.shards)
        declared = actor_memory_bytes(open_destination(dst, s3.options), Storage(large_shard_plan.source_url),
                                      16 << 20, min(part_bytes, 64 << 20))
        print(f"s3 large shard, part {part_bytes >> 20} MiB: actor peak RSS {peak / 2**20:.0f} MiB, "
              f"declared {declared / 2**20:.0f} MiB")
        assert 0 < peak <= declared
        s3.fs().rm(dst.removeprefix("s3://"), recursive=True)  # the loopback server keeps objects in memory
    # A remote source: actors keep requests in flight, within the budget they declare for them.
    from rewriter.exec.io.copy import IOOptions

    src, _, _ = medium_plan
    s3.make_bucket("memory-src")
    s3.upload_dir(src, "s3://memory-src/src")
    synthetic_saliency(4, 32, 4, seed=3).save(tmp_path / "s.json")
    cli("plan", "s3://memory-src/src", "--storage-options", json.dumps(s3.options), "--saliency", tmp_path / "s.json",
        "--keep-frac", "0.5",
        "--max-shard-size", "12MB", "--out", tmp_path / "remote.json")
    remote = Plan.load(str(tmp_path / "remote.json"))
    io = IOOptions(inflight_bytes=64 << 20)
    result = execute_on_ray(remote, str(tmp_path / "from-s3"), workers=2, src_options=s3.options, io=io)
    peak = max(s.peak_rss_bytes for s in result.shards)
    declared = actor_memory_bytes(open_destination(str(tmp_path / "from-s3")), Storage(remote.source_url, s3.options),
                                  16 << 20, 16 << 20, io)
    print(f"s3 source: actor peak RSS {peak / 2**20:.0f} MiB, declared {declared / 2**20:.0f} MiB")
    assert 0 < peak < declared


@pytest.mark.s3
def test_verify_on_ray_reports_what_local_verify_does(ray_cluster, s3, medium_plan, tmp_path):
    import json

    from rewriter.exec.distributed.ray_executor import execute_on_ray
    from rewriter.exec.distributed.ray_verify import verify_on_ray
    from rewriter.exec.publish.verify import verify

    src, plan, _ = medium_plan
    dst = tmp_path / "dst"
    execute_on_ray(plan, str(dst), workers=2, part_bytes=5 << 20)
    good = verify(str(src), str(dst))
    assert good.ok and verify_on_ray(str(src), str(dst), workers=2).to_json() == good.to_json()
    doc = json.loads((dst / "pruning.json").read_text())
    big = next(o for o in plan.outputs if o.size > 5 << 20)
    doc["shards"][big.name]["parts"][1]["sha256"] = "0" * 64
    (dst / "pruning.json").write_text(json.dumps(doc))
    small = plan.outputs[-1]
    with open(dst / small.name, "r+b") as f:
        f.seek(small.size - 1)
        last = f.read(1)
        f.seek(small.size - 1)
        f.write(b"\xff" if last != b"\xff" else b"\x00")
    bad = verify(str(src), str(dst))
    assert not bad.ok and any(big.name in p and "part 1 " in p for p in bad.problems) and bad.mismatches
    assert verify_on_ray(str(src), str(dst), workers=2).to_json() == verify(str(src), str(dst)).to_json()
    out = cli("verify", src, dst, "--ray", "--workers", "2", expect=1)
    assert f"{big.name}: part 1 (bytes" in out and "FAILED" in out


def _kill_every_actor_at_the_gate(dst, proxy, rounds):
    """A thread that SIGKILLs every actor of the run ``rounds`` times, each time once the actors
    Ray (re)started have proved they see ``dst`` (their probe files name their pids) and each
    has a source read held at the proxy's closed gate; it opens the gate when done (or given up)."""
    import psutil

    killed: list[set[int]] = []

    def actors() -> set[int]:
        probes = dst / ".rewriter" / "probe"
        return {int(p.name.rsplit(".", 1)[1]) for p in probes.glob("*.*")} if probes.exists() else set()

    def held_by(pid: int, held: set[int]) -> bool:
        try:
            return any(c.laddr and c.laddr.port in held for c in psutil.Process(pid).net_connections("tcp"))
        except psutil.Error:
            return False

    def killer():
        dead: set[int] = set()
        deadline = time.monotonic() + 300  # only so that a broken run cannot hang the suite
        try:
            while time.monotonic() < deadline and len(killed) < rounds:
                alive, held = actors() - dead, proxy.held
                if len(alive) == 2 and all(held_by(pid, held) for pid in alive):
                    for pid in alive:
                        os.kill(pid, signal.SIGKILL)
                    killed.append(alive)
                    dead |= alive
                time.sleep(0.01)
        finally:
            proxy.open_gate()

    t = threading.Thread(target=killer)
    t.start()
    return t, killed


@pytest.mark.s3
def test_every_actor_killed_twice_in_one_run_is_waited_for(ray_cluster, s3, medium_plan, tmp_path):
    """Ray restarts killed actors: the driver waits for them (no actor is dropped while it
    restarts), retries their tasks, and the run ends with the local run's bytes. The source is
    read through a proxy whose gate holds the actors' reads, so every kill lands mid-write
    however fast the run would be."""
    from bench_io.shaper import ShapedProxy

    src, _, _ = medium_plan
    s3.make_bucket("killed-twice")
    s3.upload_dir(src, "s3://killed-twice/src")
    synthetic_saliency(4, 32, 4, seed=3).save(tmp_path / "s.json")
    cli("plan", "s3://killed-twice/src", "--storage-options", json.dumps(s3.options), "--saliency",
        tmp_path / "s.json", "--keep-frac", "0.5", "--max-shard-size", "12MB", "--out", tmp_path / "p.json")
    plan = Plan.load(str(tmp_path / "p.json"))
    execute(plan, str(tmp_path / "local"), src_options=s3.options)
    expected = tree_digest(tmp_path / "local")
    proxy = ShapedProxy(s3.endpoint, delay_s=0, conn_bytes_per_s=1e12).start()
    through = {**s3.options, "client_kwargs": {**s3.options["client_kwargs"], "endpoint_url": proxy.endpoint}}
    dst = tmp_path / "dst"
    # Reads of tensor data wait at the gate; the driver's header reads (a few KiB) pass.
    assert max(len(o.header) for o in plan.outputs) < 64 << 10
    proxy.close_gate(min_bytes=64 << 10)
    thread, killed = _kill_every_actor_at_the_gate(dst, proxy, rounds=2)
    try:
        out = cli("run", tmp_path / "p.json", "--out", dst, "--src-options", json.dumps(through), "--ray",
                  "--workers", "2", "--part-mib", "5", "--buffer-mib", "1", "--quiet", expect=None)
    finally:
        proxy.open_gate()
        thread.join()
        proxy.stop()
    assert len(killed) == 2 and all(len(k) == 2 for k in killed) and not killed[0] & killed[1], killed
    assert "every Ray actor is gone" not in out and "wrote" in out, out
    assert _same_but_records(dst, expected, plan, 5 << 20)
    assert "-> OK" in cli("verify", dst, "--src-options", json.dumps(s3.options))


def test_verify_reports_every_shard_when_a_header_is_malformed(ray_cluster, medium_plan, tmp_path):
    """A malformed shard header does not hide the other shards' problems, with and without --ray."""
    import shutil

    src, plan, _ = medium_plan
    dst = tmp_path / "dst"
    shutil.copytree(src.parent / "local", dst)
    first, second, third = plan.outputs[0], plan.outputs[1], plan.outputs[2]
    with open(dst / first.name, "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))  # a header length past the end of the file
    with open(dst / second.name, "r+b") as f:
        f.seek(9)
        f.write(b"\x00\x00\x00")  # the header's JSON broken
    with open(dst / third.name, "r+b") as f:
        f.seek(third.size - 1)
        last = f.read(1)
        f.seek(third.size - 1)
        f.write(b"\xff" if last != b"\xff" else b"\x00")
    for extra in ((), ("--ray", "--workers", "2")):
        out = cli("verify", src, dst, *extra, expect=1)
        assert f"{first.name}: header differs from the plan" in out, out
        assert f"{second.name}: header differs from the plan" in out, out
        assert third.tensors[-1].name in out and "FAILED" in out, out
