"""The Ray executor: output shards (or parts of large ones) written by Ray CPU actors.

The driver (this process) holds the destination's lock and journal, as a local run does
(:func:`rewriter.exec.run.executor.execute`), and hands tasks to actors through
:class:`rewriter.exec.distributed.ray_driver.Driver`, which says what is checked before work starts and
what survives which failure. Actors declare the memory they use
(:func:`rewriter.exec.distributed.ray_actors.actor_memory_bytes`); tensor bytes go from storage to storage
inside them and never through Ray's object store; each one hashes what it writes.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from contextlib import closing
from typing import Any

import ray

from core.errors import ExecutionError
from core.storage import Storage
from planners.plan import Plan
from planners.tensors import OutputShard
from rewriter.exec.dest import (
    PartJournal,
    RunObserver,
    abort_parts,
    leftover_parts,
    open_destination,
)
from rewriter.exec.distributed.ray_actors import PROBE_DIR, ShardWriter, actor_memory_bytes
from rewriter.exec.distributed.ray_assembly import Assemblies
from rewriter.exec.distributed.ray_driver import Driver, remove_probes
from rewriter.exec.options import CONNECT_TIMEOUT_S, RunOptions
from rewriter.exec.run.executor import RunResult, ShardResult, execute

log = logging.getLogger(__name__)

#: Size of each multipart-upload part; a task's part is a whole number of them.
MAX_UPLOAD_PART_BYTES = 64 << 20


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


def _upload_part_bytes(part_bytes: int) -> int:
    """The multipart-upload part size for tasks of ``part_bytes`` (a whole number of them)."""
    upload = min(part_bytes, MAX_UPLOAD_PART_BYTES)
    if part_bytes % upload or upload < 5 << 20:
        raise ExecutionError(f"part size {part_bytes:,} bytes (--part-mib) must be at least 5 MiB and a multiple of "
                             f"{upload >> 20} MiB (the multipart-upload part size)")
    return upload


def execute_on_ray(
    plan: Plan,
    dst_url: str,
    options: RunOptions | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    observer: RunObserver | None = None,
    **changes: Any,
) -> RunResult:
    """Carry out ``plan`` into ``dst_url`` with ``options.workers`` Ray actors.

    Same destination protocol as :func:`rewriter.exec.run.executor.execute` (lock, journal, atomic
    shards, index last, resume), so a Ray run and a local run of one plan produce identical
    bytes; ``options`` and ``changes`` as there. ``options.address`` connects to a running
    cluster (``"auto"`` inside ``ray job submit``); without it a local Ray instance is started
    (or the one already initialised is used). A cluster that does not answer within
    ``options.connect_timeout_s`` seconds, and actors that cannot be placed within
    ``options.pending_timeout_s`` seconds, are an :class:`ExecutionError`. Shards larger than
    ``options.part_bytes`` are split into parts written by several actors (and resumed part by
    part), where the destination takes them (:class:`rewriter.exec.dest.ShardParts`).
    """
    opts = (options or RunOptions()).changed(**changes)
    connect(opts.address, opts.connect_timeout_s)
    upload_part_bytes = _upload_part_bytes(opts.part_bytes)
    src_options, dst_options = dict(opts.src_options or {}), dict(opts.dst_options or {})
    actor_args = (plan.source_url, src_options, dst_url, dst_options, opts.buffer_bytes, opts.zero_copy,
                  opts.drop_cache, opts.io)  # requests in flight per actor, as in a run here

    def runner(todo: list[OutputShard], record: Callable[[ShardResult], None]) -> None:
        dst = open_destination(dst_url, dst_options)
        with closing(Storage(plan.source_url, src_options)) as src:
            memory = actor_memory_bytes(dst, src, opts.buffer_bytes, upload_part_bytes, opts.io)
        token = uuid.uuid4().hex
        dst.put_bytes(f"{PROBE_DIR}/{token}", token.encode())
        asm = Assemblies(plan, dst, PartJournal.load(dst, plan.digest), record, memory, opts.drop_cache,
                         getattr(observer, "parts", None))
        actors: list[Any] = []
        try:
            tasks = asm.tasks(todo, opts.part_bytes, in_parts=True)
            # Handles as Any: Ray's type stubs do not follow .options(...).remote(...).
            cls: Any = ray.remote(ShardWriter).options(num_cpus=1, memory=memory, max_restarts=-1,
                                                      max_task_retries=0, max_concurrency=2)
            actors = [cls.remote(*actor_args) for _ in range(min(opts.workers, len(tasks)))]
            if tasks:
                Driver(asm, actors, token, upload_part_bytes, opts.max_task_retries, opts.pending_timeout_s, memory,
                       progress).run(tasks)
            for name, handle in leftover_parts(dst):  # uploads of actors killed mid-shard
                abort_parts(dst, name, handle)
        finally:
            for a in actors:
                ray.kill(a)
            remove_probes(dst)

    return execute(plan, dst_url, opts, runner=runner, on_start=on_start, observer=observer)
