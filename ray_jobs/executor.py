"""The Ray executor: output shards (or parts of large ones) written by Ray CPU actors.

Ray is the engine: actors declare their memory so a node is not overcommitted, a worker process
that dies is restarted and its task retried (``max_restarts``/``max_task_retries``), and
application errors are not retried. The driver keeps a bounded number of tasks in flight, owns
the journal, aggregates progress, and receives only small results; tensor bytes go from storage
to storage inside the actors and never through Ray's object store.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import ray

from planners.cost import BASE_RSS_BYTES
from planners.plan import OutputShard, Plan, _output_from_json
from rewriter.errors import ExecutionError, RewriterError
from rewriter.executor import (
    DEFAULT_BUFFER_BYTES,
    Part,
    RunResult,
    ShardResult,
    begin_parts,
    commit_parts,
    execute,
    split_parts,
    write_output_shard,
    write_part,
)
from rewriter.storage import Storage

log = logging.getLogger(__name__)

#: Memory a Ray worker process needs besides its copy buffer (Ray's runtime is heavier than a
#: plain interpreter).
ACTOR_BASE_BYTES = 2 * BASE_RSS_BYTES
#: Shards larger than this are split into parts when the destination takes positioned writes.
DEFAULT_PART_BYTES = 1 << 30


@ray.remote
class ProgressBoard:
    """Latest bytes done per task; a retried task starts its count again."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}

    def report(self, key: str, n: int) -> None:
        self.done[key] = n

    def total(self) -> int:
        return sum(self.done.values())


class ShardWriter:
    """A Ray actor that writes output shards and parts. One task at a time per actor."""

    def __init__(self, src_url: str, src_options: Mapping[str, Any], dst_url: str, dst_options: Mapping[str, Any],
                 buffer_bytes: int, zero_copy: bool, drop_cache: bool, board_name: str):
        self.src = Storage(src_url, src_options)
        self.dst = Storage(dst_url, dst_options)
        self.buffer_bytes = buffer_bytes
        self.zero_copy = zero_copy
        self.drop_cache = drop_cache
        # By name, not handle: a restarted actor looks the board up again.
        self.board = ray.get_actor(board_name)

    def _progress(self, key: str) -> Callable[[int], None]:
        state = {"n": 0, "last": 0.0}

        def report(n: int) -> None:
            state["n"] += n
            now = time.monotonic()
            if now - state["last"] > 0.2:
                state["last"] = now
                self.board.report.remote(key, state["n"])

        return report

    def write_shard(self, out_doc: dict[str, Any]) -> dict[str, Any]:
        out = _output_from_json(out_doc, "plan")
        r = write_output_shard(out, self.src, self.dst, buffer_bytes=self.buffer_bytes,
                               progress=self._progress(out.name), zero_copy=self.zero_copy,
                               drop_cache=self.drop_cache)
        self.board.report.remote(out.name, r.size)
        return asdict(r)

    def write_part(self, part: Part, path: str) -> dict[str, Any]:
        key = f"{part.shard}#{part.index}"
        stats = write_part(part, path, self.src, buffer_bytes=self.buffer_bytes,
                           progress=self._progress(key), zero_copy=self.zero_copy)
        self.board.report.remote(key, part.length)
        return asdict(stats)

    def pid(self) -> int:
        import os

        return os.getpid()


def _unwrap(err: Exception) -> Exception:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, RewriterError) else err


def execute_on_ray(
    plan: Plan,
    dst_url: str,
    *,
    address: str | None = None,
    workers: int = 2,
    part_bytes: int = DEFAULT_PART_BYTES,
    max_task_retries: int = 3,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    progress: Callable[[int], None] | None = None,
    src_options: Mapping[str, Any] | None = None,
    dst_options: Mapping[str, Any] | None = None,
    zero_copy: bool = True,
    drop_cache: bool = False,
    **kwargs: Any,
) -> RunResult:
    """Carry out ``plan`` into ``dst_url`` with ``workers`` Ray actors.

    Same destination protocol as :func:`rewriter.executor.execute` (journal, atomic shards,
    index last, resume), so a Ray run and a local run of one plan produce identical bytes.
    ``address`` connects to a running cluster (``"auto"`` inside ``ray job submit``); without
    it a local Ray instance is started (or the one already initialised is used).
    """
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    src_options = dict(src_options or {})
    dst_options = dict(dst_options or {})
    board_name = f"rewriter-progress-{uuid.uuid4().hex[:12]}"
    board = ProgressBoard.options(name=board_name).remote()
    actor_cls = ray.remote(ShardWriter).options(
        num_cpus=1, memory=ACTOR_BASE_BYTES + buffer_bytes,
        max_restarts=-1, max_task_retries=max_task_retries,
    )
    actors = [actor_cls.remote(plan.source_url, src_options, dst_url, dst_options, buffer_bytes, zero_copy,
                               drop_cache, board_name) for _ in range(max(1, workers))]
    docs = {o["name"]: o for o in plan.to_json()["outputs"]}

    def runner(todo: list[OutputShard], record: Callable[[ShardResult], None]) -> None:
        dst = Storage(dst_url, dst_options)
        tasks: list[tuple[str, Any]] = []  # (kind, payload)
        parts_left: dict[str, int] = {}
        part_files: dict[str, str] = {}
        part_stats: dict[str, ShardResult] = {}
        for out in todo:
            if dst.is_local and workers > 1 and out.size > part_bytes:
                parts = split_parts(out, part_bytes)
                part_files[out.name] = begin_parts(dst, out, plan.digest)
                parts_left[out.name] = len(parts)
                part_stats[out.name] = ShardResult(out.name, out.size, "")
                tasks += [("part", p) for p in parts]
            else:
                tasks.append(("shard", out))
        by_name = {o.name: o for o in todo}
        free = list(actors)
        in_flight: dict[Any, tuple[Any, str, Any]] = {}
        shown = 0
        t0 = {name: time.perf_counter() for name in parts_left}
        while tasks or in_flight:
            while tasks and free:
                actor = free.pop()
                kind, payload = tasks.pop(0)
                ref = (actor.write_part.remote(payload, part_files[payload.shard]) if kind == "part"
                       else actor.write_shard.remote(docs[payload.name]))
                in_flight[ref] = (actor, kind, payload)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.25)
            if progress:
                total = ray.get(board.total.remote())
                if total > shown:
                    progress(total - shown)
                    shown = total
            for ref in ready:
                actor, kind, payload = in_flight.pop(ref)
                free.append(actor)
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise _unwrap(e) from None
                except ray.exceptions.RayActorError as e:
                    raise ExecutionError(f"a Ray worker died {max_task_retries + 1} times writing "
                                         f"{getattr(payload, 'name', getattr(payload, 'shard', '?'))}: {e}") from None
                if kind == "shard":
                    record(ShardResult(**res))
                    continue
                acc = part_stats[payload.shard]
                acc.bytes_read += res["bytes_read"]
                acc.zero_copy_bytes += res["zero_copy_bytes"]
                parts_left[payload.shard] -= 1
                if parts_left[payload.shard] == 0:
                    out = by_name[payload.shard]
                    acc.sha256 = commit_parts(dst, out, part_files[out.name], buffer_bytes, drop_cache)
                    acc.seconds = time.perf_counter() - t0[out.name]
                    record(acc)

    try:
        return execute(plan, dst_url, src_options=src_options, dst_options=dst_options, buffer_bytes=buffer_bytes,
                       progress=None, zero_copy=zero_copy, drop_cache=drop_cache, runner=runner, **kwargs)
    finally:
        for a in [*actors, board]:
            ray.kill(a)
