"""The Ray actor of a distributed rewrite: :class:`ShardWriter` writes whole shards and parts.

An actor answers three kinds of calls: :meth:`ShardWriter.probe` (can this node see the
destination the driver sees?), one write at a time (:meth:`~ShardWriter.write_shard`,
:meth:`~ShardWriter.write_part`), and :meth:`~ShardWriter.progress`, which the driver polls
while a write runs (actors run two threads for that). Every answer is small: tensor bytes go from
storage to storage inside the actor, each part hashed as it is written.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import ray

from core.storage import Storage
from planners.tensors import OutputShard
from rewriter.exec.dest import STATE_DIR, Destination, open_destination
from rewriter.exec.distributed.parts import Part, write_part
from rewriter.exec.io import IOOptions
from rewriter.exec.run import peak_rss_bytes, write_output_shard

#: Where the driver and every actor leave the files that prove they see one destination.
PROBE_DIR = f"{STATE_DIR}/probe"
#: Resident memory of an actor besides its copy buffers and upload part, from the peak RSS
#: (``VmHWM``) of actors with 16 MiB buffers (a ring of four reading a local source): 98-154 MiB
#: writing to a local folder, 278-288 MiB to S3 through s3fs and boto (5 MiB and 1 GiB parts,
#: uploads overlapping reads), 130 MiB reading from S3 with 64 MiB in flight; with a margin.
#: ``test_actors_stay_within_the_memory_they_declare`` holds actors to it.
LOCAL_BASE_BYTES = 192 << 20
REMOTE_BASE_BYTES = 256 << 20
#: s3fs uploads a whole shard's buffered block as ``bytes`` through botocore and aiohttp, which
#: hold about three times the block while it is sent (measured: 48 MiB for a 16 MiB block).
#: Multipart parts are sent from their one buffer as a stream
#: (:class:`rewriter.exec.io.partoutputs.PartBody`): one part.
S3FS_BLOCK_COPIES = 3


def actor_memory_bytes(dst: Destination, src: Storage, buffer_bytes: int, upload_part_bytes: int,
                       io: IOOptions | None = None) -> int:
    """What a :class:`ShardWriter` declares to Ray: its base; the copy buffers
    (:meth:`IOOptions.buffer_memory`: a ring reading a local source, the ``--max-inflight-mib``
    budget reading a remote one); and on object stores the larger of the upload part it fills
    (one buffer) and what s3fs holds sending a whole shard's block."""
    data = (io or IOOptions()).buffer_memory(buffer_bytes, src.is_local)
    if dst.zero_copy:
        return LOCAL_BASE_BYTES + data
    block = max(buffer_bytes, 5 << 20)  # S3Destination's block size for whole shards
    return REMOTE_BASE_BYTES + data + max(upload_part_bytes, S3FS_BLOCK_COPIES * block)


def node_of_this_process() -> dict[str, str]:
    ctx = ray.get_runtime_context()
    return {"node": str(ctx.get_node_id()), "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
            "pid": str(os.getpid())}


class ShardWriter:
    """A Ray actor that writes output shards and parts, one write at a time."""

    def __init__(self, src_url: str, src_options: Mapping[str, Any], dst_url: str, dst_options: Mapping[str, Any],
                 buffer_bytes: int, zero_copy: bool, drop_cache: bool, io: IOOptions | None = None):
        self.src = Storage(src_url, src_options)
        self.io = io or IOOptions()
        self.dst = open_destination(dst_url, dst_options)
        self.buffer_bytes = buffer_bytes
        self.zero_copy = zero_copy
        self.drop_cache = drop_cache
        self._done = 0

    def probe(self, token: str) -> dict[str, str]:
        """Read the driver's probe file back and write this actor's own; say where this runs.

        Returns ``error`` (instead of raising: the driver names the node) when the driver's
        file is not here, or this actor's file cannot be written.
        """
        where = node_of_this_process()
        name = f"{PROBE_DIR}/{token}"
        try:
            self.dst.storage.invalidate_cache()
            seen = self.dst.read_all(name) if self.dst.exists(name) else None
            if seen != token.encode():
                return {**where, "error": f"{self.dst.describe(name)}, which the driver wrote, is not there"}
            mine = f"{name}.{ray.get_runtime_context().get_actor_id()}.{os.getpid()}"
            self.dst.put_bytes(mine, where["node"].encode())
        except Exception as e:  # reported by the driver with the node's name
            return {**where, "error": f"{type(e).__name__}: {e}"}
        return {**where, "probe": mine}

    def progress(self) -> int:
        """Bytes the current write has copied so far (polled by the driver)."""
        return self._done

    def _count(self, n: int) -> None:
        self._done += n

    def write_shard(self, out: OutputShard) -> dict[str, Any]:
        self._done = 0
        t0 = time.perf_counter()
        r = write_output_shard(out, self.src, self.dst, buffer_bytes=self.buffer_bytes, progress=self._count,
                               zero_copy=self.zero_copy, drop_cache=self.drop_cache, io=self.io)
        r.seconds = time.perf_counter() - t0
        r.peak_rss_bytes = peak_rss_bytes()
        return {"shard": asdict(r)}

    def write_part(self, part: Part, handle: str, upload_part_bytes: int) -> dict[str, Any]:
        self._done = 0
        entry = write_part(part, handle, self.src, self.dst, upload_part_bytes=upload_part_bytes,
                           buffer_bytes=self.buffer_bytes, progress=self._count, zero_copy=self.zero_copy,
                           io=self.io)
        return {"part": {**entry, "shard": part.shard, "index": part.index}, "rss": peak_rss_bytes()}
