"""Carried bytes written by the Ray executor and into an S3 destination (moto on loopback), and a
plan with its sidecar read from S3: the same output as a local run of the same plan."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from planners.carried import carried_bytes
from planners.plan import Plan
from rewriter.exec.publish.verify import verify
from rewriter.exec.run.executor import execute
from rewriter.tools.synth import PRESETS, write_checkpoint
from tests.carried_util import plain_and_carried
from tests.conftest import tree_digest


@pytest.fixture(scope="module")
def carried_small(tmp_path_factory):
    """A small source and a plan carrying new routers in a sidecar, run locally as the reference."""
    root = tmp_path_factory.mktemp("carried")
    src = root / "src"
    write_checkpoint(src, PRESETS["small"])
    _, carried, new = plain_and_carried(src, root, max_shard_size="12MB")
    plan = Plan.load(str(carried))
    execute(plan, str(root / "local"))
    assert len(list(carried.parent.glob("carried-*.safetensors"))) == 1
    return src, carried, new, tree_digest(root / "local")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_writes_carried_bytes(ray_cluster, carried_small, tmp_path):
    from rewriter.exec.distributed.ray_executor import execute_on_ray

    src, carried, _, expected = carried_small
    plan = Plan.load(str(carried))
    execute_on_ray(plan, str(tmp_path / "whole"), workers=2)
    assert tree_digest(tmp_path / "whole") == expected
    # Shards split into parts: carried bytes land in parts written by other actors.
    assert any(o.size > 5 << 20 for o in plan.outputs)
    execute_on_ray(plan, str(tmp_path / "parts"), workers=2, part_bytes=5 << 20)
    parts = tree_digest(tmp_path / "parts")
    assert {n: d for n, d in parts.items() if n.endswith(".safetensors")} == \
        {n: d for n, d in expected.items() if n.endswith(".safetensors")}
    assert verify(str(src), str(tmp_path / "parts")).ok


@pytest.mark.s3
def test_s3_destination_and_plan_with_sidecar_on_s3(s3, carried_small, tmp_path):
    src, carried, new, expected = carried_small
    fs = s3.fs()
    s3.make_bucket("carried-bucket")
    plan = Plan.load(str(carried))
    execute(plan, "s3://carried-bucket/pruned", dst_options=s3.options, buffer_bytes=1 << 20)
    fs.invalidate_cache()
    for name, digest in expected.items():
        assert hashlib.sha256(fs.cat_file(f"carried-bucket/pruned/{name}")).hexdigest() == digest, name
    assert verify(str(src), "s3://carried-bucket/pruned", dst_options=s3.options).ok
    # A plan saved to S3 puts its sidecar beside it, and is read back with it from there.
    url = "s3://carried-bucket/plans/plan.json"
    with _s3_config(s3.options):
        plan.save(url)
        assert fs.exists(f"carried-bucket/plans/{plan.carried.sidecar_name}")
        again = Plan.load(url)
    assert again.digest == plan.digest
    assert all(carried_bytes(again, n) == new[n] for n in new)


@contextmanager
def _s3_config(options: dict) -> Iterator[None]:
    """fsspec's configuration for s3:// URLs opened without options (as plan files are)."""
    import fsspec.config

    before = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {**options, "skip_instance_cache": True}
    try:
        yield
    finally:
        if before is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = before
