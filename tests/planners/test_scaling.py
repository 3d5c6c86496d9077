"""The N-node wall-time model of a plan (planners.cost.estimate_nodes)."""

from __future__ import annotations

import pytest

from planners.cost import estimate, estimate_nodes
from planners.plan import Plan
from rewriter.tools.synth import Geometry, synthetic_saliency, write_checkpoint
from tests.conftest import cli


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Plan:
    """Four 120B-size MoE layers (sparse: headers over holes), pruned to half, 1 GB shards."""
    root = tmp_path_factory.mktemp("scale")
    write_checkpoint(root / "src", Geometry(4, 128, 4, 2880, 2880, 1024, 64, 8, 64, 4_800_000_000), sparse=True)
    synthetic_saliency(4, 128, 4, seed=5).save(root / "s.json")
    cli("plan", root / "src", "--saliency", root / "s.json", "--keep-frac", "0.5", "--max-shard-size", "1GB",
        "--out", root / "plan.json")
    return Plan.load(str(root / "plan.json"))


def test_one_node_is_bytes_over_bandwidth(plan):
    written = sum(o.size for o in plan.outputs)
    one = estimate_nodes(plan, 1, 500e6, startup_s=4.0)
    assert one.est_seconds == pytest.approx(4.0 + written / 500e6)
    assert (one.tasks, one.busy_nodes) == (len(plan.outputs), 1)
    # The single-worker cost estimate at the same total bandwidth agrees (it splits it into read and write).
    assert estimate(plan, workers=1, read_bytes_per_s=1e9, write_bytes_per_s=1e9).est_seconds == \
        pytest.approx(sum(o.data_bytes / 1e9 + o.size / 1e9 for o in plan.outputs))


def test_scaling_is_bounded_by_the_largest_task_and_the_storage(plan):
    times = [estimate_nodes(plan, n, 500e6).est_seconds for n in (1, 2, 4, 64)]
    assert times == sorted(times, reverse=True)
    largest = max(min(o.size, 1 << 30) for o in plan.outputs)
    assert times[-1] == pytest.approx(largest / 500e6)  # more nodes than tasks: one task's time
    part = estimate_nodes(plan, 64, 500e6, part_bytes=64 << 20)
    assert part.tasks > len(plan.outputs) and part.est_seconds <= (64 << 20) / 500e6 + 1e-9
    capped = estimate_nodes(plan, 64, 500e6, part_bytes=64 << 20, total_bytes_per_s=2e9)
    assert capped.est_seconds == pytest.approx(capped.bytes_written / 2e9)


def test_a_serial_driver_step_that_grows_with_bytes_caps_the_speedup(plan):
    """A driver re-reading every assembled shard at 1 GB/s: more nodes stop helping."""
    in_parts = sum(o.size for o in plan.outputs if o.size > 64 << 20)
    times = [estimate_nodes(plan, n, 500e6, part_bytes=64 << 20, serial_bytes_per_s=1e9).est_seconds
             for n in (1, 8, 64)]
    assert times[1] == times[2] == pytest.approx(in_parts / 1e9)
    assert times[0] == pytest.approx(sum(o.size for o in plan.outputs) / 500e6)  # one node writes whole shards
