"""Work on a sequence of items by a few threads, results handed back in order, with a bound on
the items and bytes in flight.

The copy paths (:mod:`rewriter.exec.io.copy`) use it for concurrent ranged reads of remote sources
(latency hidden by many requests in flight), for the buffered local path (the next reads go on
while the current buffer is written) and for positioned zero-copy segments (the disk gets several
requests at once). fsspec's ``cat_ranges`` fetches a batch and returns it whole; here a request
starts as soon as one ahead of it has been written, and a result waits only for the writer, so
the memory held is at most the byte budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class InFlight:
    """Counts of what :func:`ordered` has started and not yet handed back (for tests and stats)."""

    def __init__(self) -> None:
        self.items = 0
        self.bytes = 0
        self.max_items = 0
        self.max_bytes = 0

    def add(self, n: int) -> None:
        self.items += 1
        self.bytes += n
        self.max_items = max(self.max_items, self.items)
        self.max_bytes = max(self.max_bytes, self.bytes)

    def done(self, n: int) -> None:
        self.items -= 1
        self.bytes -= n


def ordered(
    items: Sequence[T],
    work: Callable[[T], R],
    *,
    threads: int,
    max_items: int,
    max_bytes: int,
    size: Callable[[T], int],
    on_submit: Callable[[T], None] | None = None,
    counts: InFlight | None = None,
) -> Generator[tuple[T, R], None, None]:
    """``(item, work(item))`` for each item, in order; ``work`` runs on ``threads`` threads.

    At most ``max_items`` items and ``max_bytes`` bytes (by ``size``) are started and not yet
    consumed; one item is always allowed, however large. An item's bytes are released when the
    consumer asks for the next one, so a result (a buffer) may be used until then. The first
    error is raised at its item; the rest is cancelled or waited for before returning.
    """
    counts = counts if counts is not None else InFlight()
    pending: deque[tuple[T, int, Future[R]]] = deque()
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="copy")
    nxt = 0
    try:
        while nxt < len(items) or pending:
            while nxt < len(items) and (not pending or (
                    len(pending) < max_items and counts.bytes + size(items[nxt]) <= max_bytes)):
                item = items[nxt]
                n = size(item)
                if on_submit is not None:
                    on_submit(item)
                counts.add(n)
                pending.append((item, n, pool.submit(work, item)))
                nxt += 1
            item, n, fut = pending[0]
            result = fut.result()
            yield item, result
            pending.popleft()
            counts.done(n)
    finally:
        for _, _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
