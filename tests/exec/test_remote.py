"""Remote storage through fsspec against a real S3 API server on loopback."""

from __future__ import annotations

import hashlib
import json

import pytest

from core.checkpoint import Checkpoint
from planners.cost import estimate
from planners.plan import Plan
from rewriter.exec.io.copy import IOOptions
from rewriter.exec.publish.verify import verify
from rewriter.exec.run.executor import execute
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import cli, tree_digest

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3_source(s3, tmp_path_factory):
    local = tmp_path_factory.mktemp("s3src") / "ckpt"
    write_checkpoint(local, PRESETS["small"])
    s3.make_bucket("src-bucket")
    s3.upload_dir(local, "src-bucket/small")
    return local, "s3://src-bucket/small"


def test_s3_source_fetches_only_headers_and_kept_ranges(s3, s3_source, tmp_path):
    local, url = s3_source
    opts = json.dumps(s3.options)
    synthetic_saliency(4, 32, 4, seed=7).save(tmp_path / "s.json")
    cli("plan", url, "--storage-options", opts, "--saliency", tmp_path / "s.json", "--keep-frac", "0.5",
        "--out", tmp_path / "plan.json")
    plan = Plan.load(str(tmp_path / "plan.json"))
    result = execute(plan, str(tmp_path / "dst"), src_options=s3.options, buffer_bytes=1 << 20)
    written = sum(o.size for o in plan.outputs)
    c = Checkpoint.open(url, s3.options)  # headers, config and index of a fresh open
    small_files = c.storage.counter.bytes
    # Bytes fetched by the rewrite: tensor data and the gaps merged into its requests, exactly as
    # the plan's cost report counts them; then the small files copied.
    cost = estimate(plan, buffer_bytes=1 << 20)
    assert result.bytes_read == plan.total_size + cost.over_read_bytes
    assert result.bytes_read <= 1.06 * written
    headers = sum(8 + s.header_len for s in c.shards.values())
    assert headers < small_files
    # Same bytes as a rewrite from the local copy.
    cli("plan", local, "--saliency", tmp_path / "s.json", "--keep-frac", "0.5", "--out", tmp_path / "lp.json")
    execute(Plan.load(str(tmp_path / "lp.json")), str(tmp_path / "ldst"))
    shards = {k: v for k, v in tree_digest(tmp_path / "dst").items() if k.endswith(".safetensors")}
    assert shards == {k: v for k, v in tree_digest(tmp_path / "ldst").items() if k.endswith(".safetensors")}
    assert verify(url, str(tmp_path / "dst"), src_options=s3.options).ok


@pytest.mark.parametrize("max_gap", [0, 64 << 10])
def test_s3_source_counts_every_byte_fetched(s3, s3_source, tmp_path, max_gap):
    """Count at the storage layer across the whole job: open, plan, run; with and without
    neighbouring ranges merged into one request."""
    from core.storage import Storage
    from planners.build import build_plan
    from planners.policies import Domain, KeepPolicy
    from planners.selection import select_keep
    from rewriter.exec.dest.destination import open_destination
    from rewriter.exec.run.executor import write_output_shard

    _, url = s3_source
    storage = Storage(url, s3.options)
    c = Checkpoint.open(url, storage=storage)
    opened = storage.counter.bytes
    decision = select_keep([Domain(synthetic_saliency(4, 32, 4, seed=7))], [0, 1, 2, 3], 32, 4, KeepPolicy(keep_frac=0.5))
    plan = build_plan(c, decision)
    dst = open_destination(str(tmp_path / "d"))
    (tmp_path / "d").mkdir()
    requests = storage.counter.requests
    for out in plan.outputs:
        write_output_shard(out, storage, dst, buffer_bytes=1 << 20, io=IOOptions(max_gap=max_gap))
    fetched = storage.counter.bytes - opened
    written = sum(o.size for o in plan.outputs)
    cost = estimate(plan, buffer_bytes=1 << 20, max_gap=max_gap)
    copied = sum(d["size"] for d in plan.copy_digests.values())  # planning hashes the files a run copies
    assert fetched == plan.total_size + cost.over_read_bytes + copied
    assert storage.counter.requests - requests == cost.range_requests
    if max_gap == 0:
        assert cost.over_read_bytes == 0 and fetched <= written
    else:  # biases and small scales of kept experts merged: fewer requests, a few bytes more
        assert 0 < cost.over_read_bytes and fetched <= 1.06 * written
        assert cost.range_requests < estimate(plan, buffer_bytes=1 << 20, max_gap=0).range_requests


def test_s3_destination_whole_objects(s3, tiny, tmp_path):
    fs = s3.fs()
    s3.make_bucket("dst-bucket")
    synthetic_saliency(2, 8, 2, seed=2).save(tmp_path / "s.json")
    cli("plan", tiny, "--saliency", tmp_path / "s.json", "--keep-frac", "0.5", "--max-shard-size", "60KB",
        "--out", tmp_path / "p.json")
    plan = Plan.load(str(tmp_path / "p.json"))
    execute(plan, "s3://dst-bucket/pruned", dst_options=s3.options, buffer_bytes=8192)
    execute(plan, str(tmp_path / "local"))
    fs.invalidate_cache()
    for name, digest in tree_digest(tmp_path / "local").items():
        assert hashlib.sha256(fs.cat_file(f"dst-bucket/pruned/{name}")).hexdigest() == digest, name
    assert not fs.exists("dst-bucket/pruned/.rewriter/journal.json")
    report = verify(str(tiny), "s3://dst-bucket/pruned", dst_options=s3.options)
    assert report.ok, report
    # The same plan again: already complete.
    again = execute(plan, "s3://dst-bucket/pruned", dst_options=s3.options)
    assert again.already_complete


def test_failed_s3_upload_leaves_no_object(s3, tiny, tmp_path):
    """A shard whose source turns out short is aborted: no partial object, no index."""
    from rewriter.exec.dest.destination import open_destination

    fs = s3.fs()
    s3.make_bucket("abort-bucket")
    dst = open_destination("s3://abort-bucket/x", s3.options)
    out = dst.create_output("model-00000-of-00000.safetensors", 5 << 20)
    out.write(b"\0" * (6 << 20))  # one multipart part is uploaded
    out.abort()
    fs.invalidate_cache()
    assert not fs.exists("abort-bucket/x/model-00000-of-00000.safetensors")


def test_hf_urls_resolve_to_the_hub_filesystem():
    """hf:// sources go through huggingface_hub's fsspec filesystem (no request is made here;
    the Hub itself cannot be reached from the test machines)."""
    from huggingface_hub import HfFileSystem

    from core.storage import Storage

    s = Storage("hf://openai/gpt-oss-20b")
    assert isinstance(s.fs, HfFileSystem) and not s.is_local
    assert s.path("config.json") == "openai/gpt-oss-20b/config.json"
