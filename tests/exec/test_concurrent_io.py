"""Concurrent copy paths: requests in flight are bounded (asserted by a shaped S3 server that
counts them), gap merging fetches exactly the bytes the plan predicts, and every path writes the
same bytes as the sequential one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from core.checkpoint import Checkpoint
from core.storage import Storage
from planners.cost import estimate
from planners.plan import Plan
from planners.reads import Read, over_read, plan_reads
from planners.source_check import check_source
from planners.tensors import Segment
from rewriter.exec.dest.destination import open_destination
from rewriter.exec.io.copy import CopyStats, IOOptions, RangeCopier, copy_segments
from rewriter.exec.run.executor import execute, write_output_shard
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import cli, tree_digest

MiB = 1 << 20


# --- requests from ranges ------------------------------------------------------------------------

def test_plan_reads_merges_near_neighbours_in_write_order_and_splits_long_ranges():
    ops = [
        Segment("a", 0, 100), Segment("a", 150, 50),  # gap 50: merged at max_gap 64
        Segment("a", 300, 10),  # gap 100: a new request
        Segment.literal(b"xy"),  # literals stay in place and break merging
        Segment("a", 310, 10),
        Segment("b", 0, 600),  # split at max_request 256
        Segment("b", 590, 10),  # backwards: never merged (the writes keep their order)
    ]
    reads = plan_reads(ops, max_gap=64, max_request=256)
    assert [(r.shard, r.start, r.end, r.slices) for r in reads if r.data is None] == [
        ("a", 0, 200, ((0, 100), (150, 50))),
        ("a", 300, 310, ((0, 10),)),
        ("a", 310, 320, ((0, 10),)),
        ("b", 0, 256, ((0, 256),)), ("b", 256, 512, ((0, 256),)), ("b", 512, 600, ((0, 88),)),
        ("b", 590, 600, ((0, 10),)),
    ]
    assert [r.data for r in reads if r.data is not None] == [b"xy"]
    assert over_read(reads) == 50
    # Every wanted byte once, in order.
    assert sum(r.wanted for r in reads) == sum(op.length for op in ops)
    assert over_read(plan_reads(ops, max_gap=0, max_request=256)) == 0
    assert all(r.contiguous for r in plan_reads(ops, max_gap=0, max_request=1 << 30))
    assert not Read("a", 0, 200, ((0, 100), (150, 50))).contiguous


# --- local paths ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_plan(tmp_path_factory) -> Plan:
    d = tmp_path_factory.mktemp("cio")
    write_checkpoint(d / "src", PRESETS["small"])
    synthetic_saliency(4, 32, 4, seed=3).save(d / "s.json")
    cli("plan", d / "src", "--saliency", d / "s.json", "--keep-frac", "0.5", "--max-shard-size", "6MB",
        "--out", d / "p.json")
    return Plan.load(str(d / "p.json"))


def _shard_digests(d: Path) -> dict[str, str]:
    return {k: v for k, v in tree_digest(d).items() if k.endswith(".safetensors")}


@pytest.mark.parametrize("zero_copy", [True, False])
def test_local_paths_write_the_sequential_bytes_with_several_requests_in_flight(small_plan, tmp_path, zero_copy):
    sequential = execute(small_plan, str(tmp_path / "seq"), zero_copy=zero_copy, io=IOOptions(inflight_bytes=0))
    # Pieces of at most 1 MiB (the buffer) or 32 MiB (zero-copy), several of them at once.
    src = Storage(small_plan.source_url)
    dst = open_destination(str(tmp_path / "one"))
    (tmp_path / "one").mkdir()
    out = max(small_plan.outputs, key=lambda o: o.size)
    copier = RangeCopier(src, MiB, CopyStats(), None, zero_copy=zero_copy, io=IOOptions(segment_threads=4))
    sink = dst.create_output(out.name, MiB, hash_trailing=copier.zero_copy)
    sink.write(out.header)
    copy_segments(copier, out.copy_ops(), sink)
    digest = sink.commit()
    copier.close()
    assert copier.counts.max_items > 1  # concurrency happened
    assert copier.counts.max_bytes <= (4 * MiB if not zero_copy else 8 * 32 * MiB)
    assert (copier.stats.zero_copy_bytes > 0) == zero_copy
    assert digest == hashlib.sha256((tmp_path / "seq" / out.name).read_bytes()).hexdigest()
    assert digest == next(s.sha256 for s in sequential.shards if s.name == out.name)
    # A whole run with several shards at once: the same files.
    execute(small_plan, str(tmp_path / "jobs"), zero_copy=zero_copy, io=IOOptions(jobs=3), buffer_bytes=MiB)
    assert tree_digest(tmp_path / "jobs") == tree_digest(tmp_path / "seq")


# --- remote paths through the shaped server ------------------------------------------------------

@pytest.fixture(scope="module")
def shaped(s3, small_plan):
    from bench_io.shaper import ShapedProxy

    s3.make_bucket("shaped")
    s3.upload_dir(Path(small_plan.source_url), "shaped/small")
    proxy = ShapedProxy(s3.endpoint, delay_s=0.01, conn_bytes_per_s=200e6).start()
    opts = {**s3.options, "client_kwargs": {**s3.options["client_kwargs"], "endpoint_url": proxy.endpoint}}
    yield proxy, opts
    proxy.stop()


@pytest.mark.s3
@pytest.mark.parametrize("requests,budget_mib,max_gap", [(4, 3, 64 << 10), (8, 64, 0)])
def test_remote_requests_in_flight_are_bounded_and_bytes_exact(shaped, small_plan, tmp_path, requests, budget_mib,
                                                               max_gap):
    proxy, opts = shaped
    url = "s3://shaped/small"
    storage = Storage(url, {**opts, "skip_instance_cache": True})
    c = Checkpoint.open(url, storage=storage)
    plan = dataclasses.replace(small_plan, source_url=url)
    check_source(plan, c)
    dst = open_destination(str(tmp_path / "d"))
    (tmp_path / "d").mkdir()
    io = IOOptions(inflight_requests=requests, inflight_bytes=budget_mib * MiB, max_gap=max_gap)
    proxy.reset()
    results = [write_output_shard(o, storage, dst, buffer_bytes=MiB, io=io) for o in plan.outputs]
    seen = proxy.reset()
    cost = estimate(plan, buffer_bytes=MiB, max_gap=max_gap)
    # The server saw exactly the requests and bytes the plan's cost report predicts...
    assert seen.ranged_gets == cost.range_requests
    assert seen.ranged_bytes == plan.total_size + cost.over_read_bytes == sum(r.bytes_read for r in results)
    # ...never more at once than allowed, and more than one at once.
    assert 1 < seen.max_in_flight <= requests
    assert seen.max_bytes_in_flight <= budget_mib * MiB
    written = sum(o.size for o in plan.outputs)
    assert seen.ranged_bytes <= (1.0 if max_gap == 0 else 1.06) * written
    # The same bytes as the sequential path from the local source.
    local = {o.name: s for o, s in zip(plan.outputs, results)}
    seq = execute(small_plan, str(tmp_path / "seq"), io=IOOptions(inflight_bytes=0))
    assert {s.name: s.sha256 for s in seq.shards} == {k: v.sha256 for k, v in local.items()}


@pytest.mark.s3
def test_the_shaped_server_counts_a_request_until_its_last_bytes_are_handed_over(shaped):
    """A client that reads each response whole before it sends the next request holds one request
    at a time, and the server never counts more: a request stops counting before its last bytes
    go, not after the proxy's thread next runs (by then the next request may have arrived)."""
    proxy, opts = shaped
    storage = Storage("s3://shaped/small", {**opts, "skip_instance_cache": True})
    name = "model-00000-of-00004.safetensors"
    n = 512 << 10
    step = (storage.size(name) - n) // 40
    proxy.reset()
    for i in range(40):
        assert len(storage.read_range(name, i * step, i * step + n)) == n
    seen = proxy.reset()
    assert seen.ranged_gets == 40 and seen.ranged_bytes == 40 * n
    assert seen.max_in_flight == 1 and seen.max_bytes_in_flight == n


@pytest.mark.s3
def test_remote_run_from_the_cli_matches_the_sequential_run(shaped, small_plan, tmp_path):
    proxy, opts = shaped
    p = tmp_path / "p.json"
    doc = small_plan.to_json()
    doc["source"]["url"] = "s3://shaped/small"
    p.write_text(json.dumps(doc))
    common = ["--src-options", json.dumps(opts), "--quiet", "--buffer-mib", "1"]
    cli("run", p, "--out", tmp_path / "before", "--max-inflight-mib", "0", *common)
    proxy.reset()
    cli("run", p, "--out", tmp_path / "after", "--max-inflight-mib", "2", "--max-inflight-requests", "2", *common)
    seen = proxy.reset()
    # (Opening the checkpoint reads the shards' small headers at once; the data stays within 2 MiB.)
    assert seen.ranged_gets > 0 and seen.max_bytes_in_flight <= 2 * MiB
    assert tree_digest(tmp_path / "after") == tree_digest(tmp_path / "before")
    execute(small_plan, str(tmp_path / "local"))
    assert _shard_digests(tmp_path / "after") == _shard_digests(tmp_path / "local")


def test_cost_model_counts_latency_concurrency_and_the_link(small_plan):
    ops = [o.copy_ops() for o in small_plan.outputs]
    reads = [[r for r in plan_reads(x, max_gap=0, max_request=MiB) if r.data is None] for x in ops]
    bw, lat, wbw = 50e6, 0.02, 1e9

    def est(**kw):
        return estimate(small_plan, read_bytes_per_s=bw, write_bytes_per_s=wbw, buffer_bytes=MiB, max_gap=0,
                        latency_s=lat, **kw)

    per_shard = [len(rs) * lat + sum(r.size for r in rs) / bw for rs in reads]
    sequential = est()
    assert sequential.est_seconds == pytest.approx(sum(t + o.size / wbw for t, o in zip(per_shard, small_plan.outputs)))
    # Eight requests in flight: an eighth of the reads (the writes overlap them).
    eight = est(inflight=8)
    assert eight.est_seconds == pytest.approx(sum(max(t / 8, o.size / wbw) for t, o in zip(per_shard, small_plan.outputs)))
    # ...unless the byte budget allows fewer (two 1 MiB requests), or the link is slower.
    assert est(inflight=8, inflight_bytes=2 * MiB).est_seconds == pytest.approx(
        sum(max(t / 2, o.size / wbw) for t, o in zip(per_shard, small_plan.outputs)))
    fetched = sum(r.size for rs in reads for r in rs)
    assert est(inflight=8, link_bytes_per_s=10e6).est_seconds == pytest.approx(fetched / 10e6)
    assert eight.peak_rss_per_worker > sequential.peak_rss_per_worker


@pytest.mark.s3
def test_plan_estimates_what_a_default_run_does(shaped, small_plan, tmp_path):
    """`rewriter plan` of a remote source assumes the run's default requests in flight and gap
    merging; of a local source, one range at a time and no over-read."""
    _, opts = shaped
    src = Path(small_plan.source_url)
    s = tmp_path / "s.json"
    synthetic_saliency(4, 32, 4, seed=3).save(s)
    args = ["--saliency", s, "--keep-frac", "0.5", "--max-shard-size", "6MB", "--json"]
    remote = json.loads(cli("plan", "s3://shaped/small", "--storage-options", json.dumps(opts), *args))["cost"]
    local = json.loads(cli("plan", src, *args))["cost"]
    assert remote["inflight"] == IOOptions().inflight_requests and local["inflight"] == 0
    assert remote["over_read_bytes"] > 0 and local["over_read_bytes"] == 0
    assert remote["range_requests"] < local["range_requests"]
    assert remote["est_seconds"] < local["est_seconds"]  # overlapped, 16 streams
    pinned = json.loads(cli("plan", "s3://shaped/small", "--storage-options", json.dumps(opts), "--inflight", "0",
                            *args))["cost"]
    assert pinned["inflight"] == 0 and pinned["est_seconds"] > remote["est_seconds"]
