"""The run: carry out a plan into a destination, atomically and resumably.

Order of work in the destination ``DST``:

1. ``DST/.rewriter/lock`` is taken for the whole run (:mod:`rewriter.exec.dest.lock`): a second run into
   the same destination stops with the holder's name. ``DST/.rewriter/journal.json`` names the
   plan; a different plan's journal or output is refused (unless ``force``).
2. Each output shard is written under a temporary name in ``DST/.rewriter/tmp/``, fsynced and
   renamed into place (object stores: a multipart upload completed only when the shard is
   whole); then the journal records its size and sha256.
3. ``config.json`` (patched; a GGUF output carries its metadata in its first file instead), the
   source's other files, and ``pruning.json`` (provenance with the whole plan and every shard's
   sha256).
4. ``model.safetensors.index.json`` (GGUF: ``model.gguf.index.json``) last: its presence means the
   checkpoint is complete.
5. The journal is removed, then the rest of ``DST/.rewriter/``. The index without a journal is
   a finished output: a run of the same plan that finds one removes whatever state a run killed
   during this step left, and writes nothing else.

A run killed at any point and started again skips the shards its journal vouches for (their
hash is checked again) and ends byte-identical to an uninterrupted run. The journal and the
destination checks are in :mod:`rewriter.exec.dest.journal`; how each kind of storage is written, in
:mod:`rewriter.exec.dest.destination`.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import DestinationFullError, ExecutionError, PlanError
from core.storage import Storage
from planners.plan import Plan, require_source
from planners.tensors import OutputShard
from rewriter.exec.dest import (
    Destination,
    DestinationLock,
    RunObserver,
    ShardResult,
    open_destination,
    pending_shards,
    prepare_destination,
)
from rewriter.exec.io import CopyStats, IOOptions, Progress, RangeCopier, copy_segments
from rewriter.exec.options import DEFAULT_BUFFER_BYTES, RunOptions
from rewriter.exec.run.finish import finalize
from rewriter.exec.run.jobs import default_jobs, locked, run_jobs
from rewriter.exec.run.preflight import check_inputs

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BUFFER_BYTES", "RunResult", "ShardResult", "execute", "write_output_shard"]


@dataclass
class RunResult:
    dst: str
    plan_digest: str
    shards: list[ShardResult] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    already_complete: bool = False

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.shards)

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards if not s.resumed)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(bytes_read=self.bytes_read, bytes_written=self.bytes_written)
        return d


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux's ``VmHWM`` belongs to the current program image; ``ru_maxrss`` would also count the
    parent's memory at the moment it forked this process.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_output_shard(
    out: OutputShard,
    src: Storage,
    dst: Destination,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    progress: Progress | None = None,
    zero_copy: bool = True,
    drop_cache: bool = False,
    io: IOOptions | None = None,
) -> ShardResult:
    """Write one output shard: header, then its segments in order; publish it atomically.

    Safe to call again for the same shard (a retry or a resume): each attempt writes its own
    temporary output and publishing is atomic.
    """
    t0 = time.perf_counter()
    stats = CopyStats()
    copier = RangeCopier(src, buffer_bytes, stats, progress, zero_copy=zero_copy and dst.zero_copy, io=io)
    sink = dst.create_output(out.name, buffer_bytes, hash_trailing=copier.zero_copy)
    try:
        sink.write(out.header)
        copy_segments(copier, out.copy_ops(), sink)
        if sink.pos != out.size:
            raise ExecutionError(f"{out.name}: wrote {sink.pos:,} bytes, planned {out.size:,}")
        digest = sink.commit(drop_cache=drop_cache)
    except BaseException:
        sink.abort()
        raise
    finally:
        copier.close()
    return ShardResult(
        out.name, out.size, digest, stats.bytes_read, time.perf_counter() - t0,
        stats.read_seconds, stats.write_seconds, stats.copy_seconds, stats.zero_copy_bytes,
    )


#: What to do with the plan a finished output publishes (its local source named by content only).
RUN_THE_PLAN = "run the plan made with `rewriter plan SRC ... --out PLAN`, not the one pruning.json publishes"

#: Writes the pending shards and reports each result (the Ray executor passes one).
ShardRunner = Callable[[list[OutputShard], Callable[[ShardResult], None]], None]


@dataclass(frozen=True)
class Hooks:
    """What a run tells its caller, and who writes its shards; see :func:`execute`."""

    progress: Progress | None = None
    runner: ShardRunner | None = None
    on_start: Callable[[int], None] | None = None
    observer: RunObserver | None = None


def execute(
    plan: Plan,
    dst_url: str,
    options: RunOptions | None = None,
    *,
    progress: Progress | None = None,
    runner: ShardRunner | None = None,
    on_start: Callable[[int], None] | None = None,
    observer: RunObserver | None = None,
    **changes: Any,
) -> RunResult:
    """Carry out ``plan`` into ``dst_url``.

    Args:
        plan: the plan (see :mod:`planners.plan`).
        dst_url: destination directory or fsspec URL.
        options: how the run writes (:class:`~rewriter.exec.options.RunOptions`: the copy
            buffer, ``force``, zero-copy, requests in flight, ``jobs``, fsspec options, ...).
        progress: called with each number of bytes copied.
        runner: executes the pending shards and reports each result (the Ray executor passes
            one); by default they run here, ``options.io.jobs`` at once.
        on_start: called with the bytes still to write once the journal has been checked.
        observer: told when the run starts writing, of each shard and of a failure (:mod:`rewriter.exec.dest.runstatus`).
        changes: fields of ``options`` to change, by name (``execute(plan, dst, force=True)``).

    Raises:
        PlanError: the source changed since planning; a non-uniform plan without permission.
        ExecutionError: destination problems, a short source, a full disk.
    """
    t0 = time.perf_counter()
    options = (options or RunOptions()).changed(**changes)
    if not plan.loadable and not options.allow_nonuniform:
        raise PlanError("this plan keeps different expert counts per layer, which stock transformers cannot "
                        "load; pass --allow-nonuniform to write it anyway")
    hooks = Hooks(progress, runner, on_start, observer)
    src = Storage(require_source(plan, RUN_THE_PLAN), options.src_options)
    dst = open_destination(dst_url, options.dst_options)
    try:
        check_inputs(plan, src, dst)
        created = dst.is_new()
        lock = DestinationLock(dst.storage)
        with lock:
            try:
                return _execute_locked(plan, src, dst, lock, t0, options, hooks)
            except BaseException:
                dst.drop_empty_state(created)
                raise
    finally:
        src.close()


def run_here(todo: list[OutputShard], src: Storage, dst: Destination, opts: RunOptions,
             progress: Progress | None, record: Callable[[ShardResult], None]) -> None:
    """Write ``todo`` in this process, ``opts.io.jobs`` shards at once (each thread its own source
    descriptors); results are recorded by this thread."""
    jobs = opts.io.jobs or default_jobs(len(todo), src, dst)
    progress = progress if jobs <= 1 else locked(progress)
    per_thread = threading.local()

    def write(out: OutputShard) -> ShardResult:
        s = src if jobs <= 1 else getattr(per_thread, "src", None)
        if s is None:
            s = per_thread.src = Storage(src.url, opts.src_options)
        return write_output_shard(out, s, dst, buffer_bytes=opts.buffer_bytes, progress=progress,
                                  zero_copy=opts.zero_copy, drop_cache=opts.drop_cache, io=opts.io)

    run_jobs(todo, write, jobs, record)


def _what_is_kept(e: DestinationFullError, plan: Plan, dst: Destination, finished: int) -> DestinationFullError:
    """A full disk's message, saying which shards the same command will not write again."""
    total = len(plan.outputs)
    if finished == 0:
        kept = f"no shard of {total} was finished"
    elif finished == total:
        kept = f"all {total} shards are finished and kept in {dst.url}, but the output is not complete"
    else:
        kept = f"{finished} of {total} shards are finished and kept in {dst.url}"
    return DestinationFullError(e.where, e.reason, kept)


def _execute_locked(plan: Plan, src: Storage, dst: Destination, lock: DestinationLock, t0: float,
                    opts: RunOptions, hooks: Hooks) -> RunResult:
    journal, complete = prepare_destination(plan, dst, force=opts.force, lock=lock)
    dst.clear_temporary()  # of killed runs: with the lock held, no other run is writing them
    result = RunResult(dst.url, plan.digest)
    if complete:
        log.info("%s already holds the complete output of this plan", dst.url)
        # The lock file this run made, and whatever a run killed after publishing the index left
        # (status document, temporaries): the same command ends as an uninterrupted run does.
        dst.remove_state()
        result.already_complete = True
        result.seconds = time.perf_counter() - t0
        return result
    todo, done = pending_shards(plan, journal, opts.buffer_bytes)
    result.shards.extend(done)

    def record(r: ShardResult) -> None:
        journal.record(r)
        result.shards.append(r)
        if hooks.observer:
            hooks.observer.shard_done(r)

    try:
        journal.flush()  # names the plan (a full disk here is reported with the shards kept, too)
        if hooks.on_start:
            hooks.on_start(sum(o.size for o in todo))
        if hooks.observer:
            hooks.observer.started(dst, plan, done)
        if hooks.runner is None:
            run_here(todo, src, dst, opts, hooks.progress, record)
        else:
            hooks.runner(todo, record)
        finalize(plan, src, dst, result.shards, opts.buffer_bytes)
    except BaseException as e:
        err = _what_is_kept(e, plan, dst, len(result.shards)) if isinstance(e, DestinationFullError) else e
        if hooks.observer:
            hooks.observer.failed(err)
        if err is e:
            raise
        raise err from None
    order = {o.name: i for i, o in enumerate(plan.outputs)}
    result.shards.sort(key=lambda r: order[r.name])
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result
