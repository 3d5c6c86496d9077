"""Several output shards written at once by one process (``rewriter run --jobs N``).

Each job writes whole shards with its own source descriptors and its own bounded buffers; the
results are recorded (journal) by the calling thread, one at a time, as jobs finish, so a run
killed at any point resumes like a sequential one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

Out = TypeVar("Out")
Res = TypeVar("Res")
Progress = Callable[[int], None]
#: Jobs a local run uses by default at most: more shards at once stop helping once the disk has
#: enough requests in flight (each job already keeps several positioned copies going).
MAX_DEFAULT_JOBS = 4


def default_jobs(shards: int, src: Any, dst: Any) -> int:
    """Output shards at once when ``--jobs`` is not given: for a local source and destination, up
    to the cores, the shards to write and MAX_DEFAULT_JOBS; one elsewhere (each shard already
    has many requests in flight)."""
    if not (src.is_local and dst.zero_copy):
        return 1
    return max(1, min(MAX_DEFAULT_JOBS, os.cpu_count() or 1, shards))


def locked(progress: Progress | None) -> Progress | None:
    """``progress`` callable from several threads."""
    if progress is None:
        return None
    lock = threading.Lock()

    def call(n: int) -> None:
        with lock:
            progress(n)

    return call


def run_jobs(todo: Sequence[Out], write: Callable[[Out], Res], jobs: int, record: Callable[[Res], None]) -> None:
    """``record(write(item))`` for every item, ``jobs`` writes at once, records in this thread.

    The first error, of a write or of recording one, stops new writes; the writes under way
    finish and are recorded (a resume skips them), then the first error is raised.
    """
    if jobs <= 1 or len(todo) <= 1:
        for item in todo:
            record(write(item))
        return
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="shard-job")
    futures: set[Future[Any]] = set()
    error: BaseException | None = None
    try:
        # Submitted inside the try: an interrupt (Ctrl-C, SIGTERM) between two submissions still
        # shuts the pool down, so no worker outlives the run and keeps the process from exiting.
        for item in todo:
            futures.add(pool.submit(write, item))
        while futures:
            done, futures = wait(futures, return_when=FIRST_COMPLETED)
            for f in done:
                if f.cancelled():
                    continue
                e = f.exception()
                if e is None:
                    try:
                        record(f.result())
                    except Exception as err:  # a shard that cannot be journaled (a full disk)
                        e = err
                if e is not None and error is None:
                    error = e
                    for g in futures:
                        g.cancel()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if error is not None:
        raise error
