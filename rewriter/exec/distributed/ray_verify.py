"""``rewriter verify --ray``: the per-shard checks of :mod:`rewriter.exec.publish.verify` as Ray tasks.

The driver opens both checkpoints and checks what is not a shard's bytes (config, source
fingerprint, shard names), exactly as a local verify does; each shard is then read once by a Ray
task on some node (header, recorded hashes, every tensor against its source slice), at most
``workers`` at a time. The report is the one a local verify gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray

from core.storage import Storage
from planners.tensors import OutputShard
from rewriter.exec.distributed.ray_actors import LOCAL_BASE_BYTES, REMOTE_BASE_BYTES
from rewriter.exec.distributed.ray_executor import connect
from rewriter.exec.options import CONNECT_TIMEOUT_S, DEFAULT_BUFFER_BYTES
from rewriter.exec.publish.verify import (
    ShardCheck,
    VerifyReport,
    check_shard,
    load_provenance_plan,
    open_both,
    open_source,
    recorded_shards,
    shards_to_check,
)


def _check(out: OutputShard, recorded: Any, tensors: Mapping[str, tuple[int, int]], src_url: str,
           src_options: Mapping[str, Any], dst_url: str, dst_options: Mapping[str, Any], buffer_bytes: int) -> ShardCheck:
    with Storage(src_url, src_options) as src, Storage(dst_url, dst_options) as dst:
        return check_shard(out, recorded, tensors, src, dst, buffer_bytes)


def verify_on_ray(
    src_url: str | None,
    dst_url: str,
    *,
    address: str | None = None,
    workers: int = 2,
    src_options: Mapping[str, Any] | None = None,
    dst_options: Mapping[str, Any] | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> VerifyReport:
    """:func:`rewriter.exec.publish.verify.verify`, with each shard checked by a Ray task."""
    src_options, dst_options = dict(src_options or {}), dict(dst_options or {})
    with Storage(dst_url, dst_options) as dst_store:
        plan = load_provenance_plan(dst_store)
        with open_source(plan, src_url, src_options, dst_store) as src_store:
            src_url = src_store.url
            report = VerifyReport(dst_store.url, src_store.url)
            dst, _ = open_both(plan, src_store, dst_store, report)
            recorded = recorded_shards(plan, dst_store, report)
            todo = shards_to_check(plan, dst, dst_store, report)
            base = LOCAL_BASE_BYTES if dst_store.is_local and src_store.is_local else REMOTE_BASE_BYTES
    connect(address, connect_timeout_s)
    task: Any = ray.remote(_check).options(num_cpus=1, memory=base + 2 * buffer_bytes, max_retries=3)
    pending: list[Any] = []
    results: dict[Any, int] = {}
    checks: list[ShardCheck | None] = [None] * len(todo)
    for i, (out, tensors) in enumerate(todo):
        if len(pending) >= max(1, workers):
            _collect(pending, results, checks)
        ref = task.remote(out, recorded[out.name], tensors, src_url, src_options, dst_url, dst_options,
                          buffer_bytes)
        results[ref] = i
        pending.append(ref)
    while pending:
        _collect(pending, results, checks)
    for c in checks:
        if c is not None:
            report.add(c)
    return report


def _collect(pending: list[Any], results: dict[Any, int], checks: list[ShardCheck | None]) -> None:
    ready, _ = ray.wait(pending, num_returns=1)
    for ref in ready:
        pending.remove(ref)
        checks[results[ref]] = ray.get(ref)
