"""The Ray executor: output shards (or parts of large ones) written by Ray CPU actors.

Ray is the engine: actors declare their memory so a node is not overcommitted, a worker process
that dies is restarted and its task retried (``max_restarts``/``max_task_retries``), and
application errors are not retried. The driver hands tasks to free actors through
``ray.util.ActorPool`` (one task per actor in flight), owns the journal, aggregates progress, and
receives only small results; tensor bytes go from storage
to storage inside the actors and never through Ray's object store.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.util import ActorPool

from planners.plan import OutputShard, Plan
from rewriter.core.errors import ExecutionError, RewriterError
from rewriter.core.storage import Storage
from rewriter.exec.copy import DEFAULT_BUFFER_BYTES
from rewriter.exec.destination import Destination, open_destination
from rewriter.exec.executor import RunResult, ShardResult, execute, write_output_shard
from rewriter.exec.parts import Part, split_parts, write_part
from rewriter.exec.throttle import Throttle

log = logging.getLogger(__name__)

#: How long to wait for a Ray cluster given by address to answer.
CONNECT_TIMEOUT_S = 30.0
#: Memory a Ray actor process needs besides its copy buffer and upload part: an idle actor with
#: this package imported measured 89 MiB of RSS.
ACTOR_BASE_BYTES = 128 << 20
#: Shards larger than this are split into parts written by several actors, where the destination
#: takes positioned writes (a shared filesystem) or multipart uploads (S3-compatible stores).
DEFAULT_PART_BYTES = 1 << 30
#: Size of each multipart-upload part; a task's part is a whole number of them.
MAX_UPLOAD_PART_BYTES = 64 << 20


@dataclass
class _Assembly:
    """A shard being written in parts by several actors."""

    out: OutputShard
    parts_left: int
    result: ShardResult
    t0: float
    handle: str
    uploaded: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False


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
        self.dst = open_destination(dst_url, dst_options)
        self.buffer_bytes = buffer_bytes
        self.zero_copy = zero_copy
        self.drop_cache = drop_cache
        # By name, not handle: a restarted actor looks the board up again.
        self.board = ray.get_actor(board_name)

    def actor_id(self) -> str:
        """This actor's id, as Ray's errors name it (unchanged by restarts)."""
        return str(ray.get_runtime_context().get_actor_id())

    def _progress(self, key: str) -> Callable[[int], None]:
        done = [0]
        throttle = Throttle(0.2)

        def report(n: int) -> None:
            done[0] += n
            if throttle.due(time.monotonic()):
                self.board.report.remote(key, done[0])

        return report

    def write_shard(self, out: OutputShard) -> dict[str, Any]:
        r = write_output_shard(out, self.src, self.dst, buffer_bytes=self.buffer_bytes,
                               progress=self._progress(out.name), zero_copy=self.zero_copy,
                               drop_cache=self.drop_cache)
        self.board.report.remote(out.name, r.size)
        return {"shard": asdict(r)}

    def write_part(self, part: Part, handle: str, upload_part_bytes: int) -> dict[str, Any]:
        key = f"{part.shard}#{part.index}"
        stats, parts = write_part(part, handle, self.src, self.dst, upload_part_bytes=upload_part_bytes,
                                  buffer_bytes=self.buffer_bytes, progress=self._progress(key),
                                  zero_copy=self.zero_copy)
        self.board.report.remote(key, part.length)
        return {"part_of": part.shard, "stats": asdict(stats), "parts": parts}


#: One unit of work for an actor: a whole output shard, or a part of a large one.
Task = OutputShard | Part


@dataclass
class _Driver:
    """Hands shards and parts to free actors (``ray.util.ActorPool``) and publishes finished shards."""

    plan: Plan
    dst: Destination
    actors: list[Any]
    board: Any
    part_bytes: int
    upload_part_bytes: int
    buffer_bytes: int
    drop_cache: bool
    max_task_retries: int
    progress: Callable[[int], None] | None
    assemblies: dict[str, _Assembly] = field(default_factory=dict)
    shown: int = 0

    def run(self, todo: list[OutputShard], record: Callable[[ShardResult], None]) -> None:
        """The executor's runner: write ``todo``, reporting each shard as it is published."""
        tasks: list[Task] = []
        try:
            for out in todo:
                if len(self.actors) > 1 and out.size > self.part_bytes and self.dst.takes_parts:
                    tasks += self._begin(out)
                else:
                    tasks.append(out)
            self._drive(tasks, record)
        finally:
            for asm in self.assemblies.values():
                if not asm.done:
                    self.dst.abort_parts(asm.out.name, asm.handle)

    def _begin(self, out: OutputShard) -> list[Part]:
        parts = split_parts(out, self.part_bytes)
        handle = self.dst.begin_parts(out.name, out.size, self.plan.digest)
        self.assemblies[out.name] = _Assembly(out, len(parts), ShardResult(out.name, out.size, ""),
                                              time.perf_counter(), handle)
        return parts

    def _drive(self, tasks: list[Task], record: Callable[[ShardResult], None]) -> None:
        pool = ActorPool(self.actors)
        ids = dict(zip(self.actors, ray.get([a.actor_id.remote() for a in self.actors])))
        running: dict[str, Task] = {}  # actor id -> the task it runs (one at a time)

        def start(actor: Any, task: Task) -> Any:
            running[ids[actor]] = task
            if isinstance(task, OutputShard):
                return actor.write_shard.remote(task)
            return actor.write_part.remote(task, self.assemblies[task.shard].handle, self.upload_part_bytes)

        for task in tasks:
            pool.submit(start, task)
        while pool.has_next():
            try:
                res = pool.get_next_unordered(timeout=0.25)
            except TimeoutError:
                self._show_progress()
                continue
            except ray.exceptions.RayTaskError as e:
                raise _unwrap(e) from None
            except ray.exceptions.RayActorError as e:
                failed = running.get(e.actor_id or "")
                what = failed.name if isinstance(failed, OutputShard) else \
                    f"part {failed.index} of {failed.shard}" if failed else "a task"
                raise ExecutionError(f"a Ray worker died {self.max_task_retries + 1} times writing {what}: {e}") from None
            self._show_progress()
            self._collect(res, record)

    def _show_progress(self) -> None:
        if self.progress:
            total = ray.get(self.board.total.remote())
            if total > self.shown:
                self.progress(total - self.shown)
                self.shown = total

    def _collect(self, res: dict[str, Any], record: Callable[[ShardResult], None]) -> None:
        if "shard" in res:
            record(ShardResult(**res["shard"]))
            return
        asm = self.assemblies[res["part_of"]]
        asm.result.bytes_read += res["stats"]["bytes_read"]
        asm.result.zero_copy_bytes += res["stats"]["zero_copy_bytes"]
        asm.uploaded += res["parts"]
        asm.parts_left -= 1
        if asm.parts_left == 0:
            record(self._finish(asm))

    def _finish(self, asm: _Assembly) -> ShardResult:
        """Publish a shard whose parts are all written; its sha256 is read back once."""
        asm.result.sha256 = self.dst.commit_parts(asm.out.name, asm.out.size, asm.handle, asm.uploaded,
                                                  self.buffer_bytes, self.drop_cache)
        asm.done = True
        asm.result.seconds = time.perf_counter() - asm.t0
        return asm.result


def _unwrap(err: Exception) -> Exception:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, RewriterError) else err


def connect(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start a local instance.

    ``ray.init`` waits without end for a cluster that is not there, so it runs in a daemon
    thread that is given up after ``timeout_s`` seconds (the process is about to report the
    error and exit; the stuck thread does not hold it).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(include_dashboard=False, log_to_driver=False)
        return
    failed: list[Exception] = []

    def init() -> None:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as e:  # reported by the caller's thread, which names the address
            failed.append(e)

    thread = threading.Thread(target=init, name="ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    where = (f"check that the cluster's head node is running and that {address} is its address (HOST:PORT of "
             f"its GCS, 6379 by default, or 'auto' on a node of the cluster)")
    if thread.is_alive():
        raise ExecutionError(f"cannot reach the Ray cluster at {address}: no answer within {timeout_s:g} s; "
                             f"{where}, or wait longer with --ray-timeout")
    if failed:
        raise ExecutionError(f"cannot connect to the Ray cluster at {address} ({failed[0]}); {where}")


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
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    **kwargs: Any,
) -> RunResult:
    """Carry out ``plan`` into ``dst_url`` with ``workers`` Ray actors.

    Same destination protocol as :func:`rewriter.exec.executor.execute` (journal, atomic shards,
    index last, resume), so a Ray run and a local run of one plan produce identical bytes.
    ``address`` connects to a running cluster (``"auto"`` inside ``ray job submit``); without
    it a local Ray instance is started (or the one already initialised is used). A cluster that
    does not answer within ``connect_timeout_s`` seconds is an :class:`ExecutionError`.
    """
    connect(address, connect_timeout_s)
    src_options = dict(src_options or {})
    dst_options = dict(dst_options or {})
    upload_part_bytes = min(part_bytes, MAX_UPLOAD_PART_BYTES)
    if part_bytes % upload_part_bytes or upload_part_bytes < 5 << 20:
        raise ExecutionError(f"part size {part_bytes:,} must be at least 5 MiB and a multiple of "
                             f"{upload_part_bytes:,} (the multipart-upload part size)")
    board_name = f"rewriter-progress-{uuid.uuid4().hex[:12]}"
    # Handles as Any: Ray's type stubs do not follow .options(...).remote(...).
    board: Any = ray.remote(ProgressBoard).options(name=board_name).remote()
    actor_cls = ray.remote(ShardWriter).options(
        num_cpus=1, memory=ACTOR_BASE_BYTES + buffer_bytes + upload_part_bytes,
        max_restarts=-1, max_task_retries=max_task_retries,
    )
    actors: list[Any] = [actor_cls.remote(plan.source_url, src_options, dst_url, dst_options, buffer_bytes, zero_copy,
                               drop_cache, board_name) for _ in range(max(1, workers))]
    driver = _Driver(plan, open_destination(dst_url, dst_options), actors, board, part_bytes, upload_part_bytes,
                     buffer_bytes, drop_cache, max_task_retries, progress)
    try:
        return execute(plan, dst_url, src_options=src_options, dst_options=dst_options, buffer_bytes=buffer_bytes,
                       progress=None, zero_copy=zero_copy, drop_cache=drop_cache, runner=driver.run, **kwargs)
    finally:
        for a in [*actors, board]:
            ray.kill(a)
