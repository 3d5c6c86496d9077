"""Per-layer dry runs: rewrite only some layers' expert tensors to measure time, bytes and memory.

Each layer's expert tensors are written as their own file (``layer-00018.safetensors``) into a
scratch directory, with the same executor code a full run uses.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from core.checkpoint import Checkpoint
from core.errors import PlanError
from core.storage import Storage
from planners.plan import Plan
from planners.source_check import check_source
from rewriter.exec.dest import open_destination
from rewriter.exec.options import DEFAULT_BUFFER_BYTES
from rewriter.exec.run.executor import write_output_shard


@dataclass
class LayerProbe:
    layer: int
    source_shards: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    read_seconds: float
    write_seconds: float
    copy_seconds: float
    peak_rss_bytes: int
    zero_copy: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RssSampler:
    """Samples this process's RSS in a thread; ``peak`` is the largest sample since ``reset``.

    Args:
        interval: seconds between samples.
        read_rss: returns the current RSS in bytes (this process's, by default).
    """

    def __init__(self, interval: float = 0.005, read_rss: Callable[[], int] | None = None):
        proc = psutil.Process()
        self._read_rss = read_rss or (lambda: proc.memory_info().rss)
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # A sample taken before a reset must not land after it: each reset starts a new
        # generation, and a sample only counts toward the generation it was taken in.
        self._generation = 0
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with self._lock:
            generation = self._generation
        rss = self._read_rss()
        with self._lock:
            if generation == self._generation:
                self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def reset(self) -> None:
        rss = self._read_rss()
        with self._lock:
            self._generation += 1
            self.peak = rss

    def __enter__(self) -> RssSampler:
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def dry_run(
    plan: Plan,
    *,
    scratch: str | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    zero_copy: bool = True,
    keep_output: bool = False,
    src_options: dict[str, Any] | None = None,
) -> list[LayerProbe]:
    """Execute a per-layer plan (``build_plan(..., layers_only=[...])``) into a scratch directory.

    Returns:
        One probe per layer, in the plan's order. The scratch files are removed unless
        ``keep_output``.
    """
    if not plan.is_dry_run:
        raise PlanError("dry_run needs a per-layer plan (built with layers_only)")
    src = Storage(plan.source_url, src_options)
    check_source(plan, Checkpoint.open(plan.source_url, storage=src))
    made = scratch is None
    scratch = scratch or tempfile.mkdtemp(prefix="rewriter-dryrun-")
    os.makedirs(scratch, exist_ok=True)
    dst = open_destination(scratch)
    probes = []
    try:
        with RssSampler() as rss:
            for out in plan.outputs:
                rss.reset()
                t0 = time.perf_counter()
                r = write_output_shard(out, src, dst, buffer_bytes=buffer_bytes, zero_copy=zero_copy)
                layer = out.tensors[0].layer
                assert layer is not None
                probes.append(LayerProbe(
                    layer=layer,
                    source_shards=sorted({s.shard for t in out.tensors for s in t.segments}),
                    bytes_read=r.bytes_read,
                    bytes_written=r.size,
                    seconds=time.perf_counter() - t0,
                    read_seconds=r.read_seconds,
                    write_seconds=r.write_seconds,
                    copy_seconds=r.copy_seconds,
                    peak_rss_bytes=rss.peak,
                    zero_copy=r.zero_copy_bytes > 0,
                ))
    finally:
        if not keep_output:
            if made:
                shutil.rmtree(scratch, ignore_errors=True)
            else:
                for out in plan.outputs:
                    p = os.path.join(scratch, out.name)
                    if os.path.exists(p):
                        os.unlink(p)
                shutil.rmtree(os.path.join(scratch, ".rewriter"), ignore_errors=True)
    return probes
