"""The options of a run, defined once, in a module that imports nothing heavy (the CLI builds
its options from it when it starts).

``rewriter run``, ``prune``, ``soft-prune``, ``submit`` and the Ray job entry point generate
their click options from these fields (:mod:`rewriter.cli.runopts`), build one
:class:`RunOptions` from what was given and hand it unchanged to
:func:`rewriter.exec.run.executor.execute` or
:func:`rewriter.exec.distributed.ray_executor.execute_on_ray`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from core.options import option

MiB = 1 << 20
DEFAULT_BUFFER_BYTES = 16 << 20
#: Remote ranges this close are one request: a few kept experts' biases and small scales apart
#: (the cost estimate's default, :data:`planners.reads.DEFAULT_MAX_GAP`, is the same).
DEFAULT_MAX_GAP = 64 << 10
#: Buffers of the local buffered path: reads go on into the others while one is written.
LOCAL_RING = 4
#: Seconds to wait for a Ray cluster at an address to answer.
CONNECT_TIMEOUT_S = 30.0
#: Seconds to wait for a Ray actor the cluster cannot place.
PENDING_TIMEOUT_S = 600.0
#: Shards larger than this are written in parts by several Ray actors.
DEFAULT_PART_BYTES = 1 << 30


@dataclass(frozen=True)
class IOOptions:
    """How many requests a shard's copy keeps in flight.

    Args:
        inflight_bytes: bytes requested and not yet written, at most (memory of the buffered
            path); 0 selects the sequential path (one request at a time).
        inflight_requests: requests in flight at most (remote sources).
        max_gap: remote reads of one shard at most this far apart are fetched as one request.
        segment_threads: positioned zero-copy pieces in flight per shard.
        jobs: output shards written at once by a local run; None: from the cores and the plan.
    """

    inflight_bytes: int = option(256 * MiB, "--max-inflight-mib", "Bytes requested and not yet written per shard, "
                                 "in MiB (bounds memory); 0: one request at a time.", unit=MiB, bounds=(0, 1 << 20))
    inflight_requests: int = option(16, "--max-inflight-requests", "Read requests in flight per shard (remote sources).",
                                    bounds=(1, 1024))
    max_gap: int = option(DEFAULT_MAX_GAP, "--max-gap-kib", "Remote ranges of a source shard at most this far apart "
                          "are read as one request.", unit=1024, bounds=(0, 1 << 20))
    #: 16: both benchmark machines (a 2-core VM's virtual disk, a 16-core H200 host) copied
    #: fastest with this many pieces in flight; the threads wait in the kernel, not on a core.
    segment_threads: int = 16
    jobs: int | None = option(None, "--jobs", "Output shards written at once by a run here (default: up to 4 for a "
                              "local source and destination, bounded by the cores and shards; 1 otherwise).",
                              bounds=(1, 256))

    @property
    def sequential(self) -> bool:
        return self.inflight_bytes <= 0

    def buffer_memory(self, buffer_bytes: int, src_is_local: bool) -> int:
        """The most copy-buffer memory one copy holds: one buffer on the sequential path, a ring
        of LOCAL_RING buffers reading a local source, the in-flight budget plus one request
        reading a remote one."""
        if self.sequential:
            return buffer_bytes
        if src_is_local:
            return LOCAL_RING * buffer_bytes
        return max(self.inflight_bytes, buffer_bytes) + buffer_bytes



@dataclass(frozen=True)
class RunOptions:
    """How a run writes, and where it runs.

    Fields in the library's units (bytes, seconds); each command-line flag says its own unit.
    ``io`` holds the requests in flight per shard and the shards at once (``--max-inflight-mib``,
    ``--max-inflight-requests``, ``--max-gap-kib``, ``--jobs``). ``src_options`` and
    ``allow_nonuniform`` come from each command's own options (``run --src-options``, ``prune
    --storage-options`` and its policy), ``max_task_retries`` from no command line.
    """

    buffer_bytes: int = option(DEFAULT_BUFFER_BYTES, "--buffer-mib", "Copy buffer in MiB; bounds the data path's memory.",
                               unit=MiB, kind="buffer_mib")
    force: bool = option(False, "--force", "Overwrite a destination holding other output.")
    zero_copy: bool = option(True, "--no-zero-copy", "Never use copy_file_range (always buffered).", negate=True)
    io: IOOptions = field(default_factory=IOOptions)
    drop_cache: bool = option(False, "--drop-cache", "Drop written pages from the page cache.")
    dst_options: Mapping[str, Any] | None = option(None, "--dst-options", "fsspec options for DST as JSON.", kind="json")
    ray: bool = option(False, "--ray", "Run on Ray CPU actors (pip install '.[ray]').")
    address: str | None = option(None, "--address", "Ray cluster address (default: start a local one).", kind="text")
    workers: int = option(2, "--workers", "Ray actors.", kind="positive")
    connect_timeout_s: float = option(CONNECT_TIMEOUT_S, "--ray-timeout",
                                      "Seconds to wait for the Ray cluster at --address to answer.", kind="seconds")
    pending_timeout_s: float = option(
        PENDING_TIMEOUT_S, "--ray-pending-timeout", "Seconds to wait for a Ray actor the cluster cannot place (no "
        "free CPU or memory, a lost node) or is restarting before its work goes to the others, or the run stops "
        "if none runs.",
        kind="seconds")
    part_bytes: int = option(
        DEFAULT_PART_BYTES, "--part-mib", "With --ray: shards larger than this are written in parts of this size by "
        "several actors and resumed part by part (5 to 64, or a multiple of 64 above 64: the parts are uploaded "
        "in pieces of at most 64 MiB).", unit=MiB, kind="part_mib")
    src_options: Mapping[str, Any] | None = None
    allow_nonuniform: bool = False
    max_task_retries: int = 3

    def changed(self, **changes: Any) -> RunOptions:
        """These options with some fields changed, by name; ``io=None`` stands for the default."""
        if "io" in changes and changes["io"] is None:
            changes["io"] = IOOptions()
        return replace(self, **changes)
