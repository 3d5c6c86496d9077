"""The local executor: carry out a plan into a destination, atomically and resumably.

Order of work in the destination ``DST``:

1. ``DST/.rewriter/lock`` is taken for the whole run (:mod:`rewriter.lock`): a second run into
   the same destination stops with the holder's name. ``DST/.rewriter/journal.json`` names the
   plan; a different plan's journal or output is refused (unless ``force``).
2. Each output shard is written under a temporary name in ``DST/.rewriter/tmp/``, fsynced and
   renamed into place (object stores: a multipart upload completed only when the shard is
   whole); then the journal records its size and sha256.
3. ``config.json`` (patched), the source's other files, and ``pruning.json`` (provenance with
   the whole plan and every shard's sha256).
4. ``model.safetensors.index.json`` last: its presence means the checkpoint is complete.
5. ``DST/.rewriter/`` is removed.

A run killed at any point and started again skips the shards its journal vouches for (their
hash is checked again) and ends byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from planners.plan import PROVENANCE_NAME, OutputShard, Plan, Segment
from rewriter.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint
from rewriter.copy import (
    OUTPUT_MODE,
    CopyStats,
    LocalOutput,
    MultipartPart,
    PartOutput,
    Progress,
    RangeCopier,
    RemoteOutput,
    fsync_dir,
    write_errors_are_clear,
)
from rewriter.errors import ExecutionError, PlanError
from rewriter.lock import LOCK_NAME, STATE_DIR, DestinationLock
from rewriter.modelcard import CARD_NAME, write_model_card
from rewriter.storage import Storage

log = logging.getLogger(__name__)

JOURNAL = f"{STATE_DIR}/journal.json"
DEFAULT_BUFFER_BYTES = 16 << 20


@dataclass
class ShardResult:
    """What writing one output shard did; small enough to pass between processes."""

    name: str
    size: int
    sha256: str
    bytes_read: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    copy_seconds: float = 0.0
    zero_copy_bytes: int = 0
    resumed: bool = False


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
    dst: Storage,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    progress: Progress | None = None,
    zero_copy: bool = True,
    drop_cache: bool = False,
) -> ShardResult:
    """Write one output shard: header, then its segments in order; publish it atomically.

    Safe to call again for the same shard (a retry or a resume): each attempt writes its own
    temporary file and the rename is atomic.
    """
    t0 = time.perf_counter()
    stats = CopyStats()
    copier = RangeCopier(src, buffer_bytes, stats, progress, zero_copy=zero_copy and dst.is_local)
    sink: LocalOutput | RemoteOutput
    if dst.is_local:
        sink = LocalOutput(dst, out.name, dst.local_path(f"{STATE_DIR}/tmp"), buffer_bytes,
                           hash_trailing=copier.zero_copy)
    else:
        sink = RemoteOutput(dst, out.name, buffer_bytes)
    try:
        sink.write(out.header)
        _copy_all(copier, out.copy_ops(), sink)
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


# --- large shards in parts (destinations with positioned writes) ---------------------------------

@dataclass(frozen=True)
class Part:
    """Bytes ``[start, start + length)`` of output shard ``shard``, made of source ``ops``."""

    shard: str
    index: int
    start: int
    ops: tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(op.length for op in self.ops)


def split_parts(out: OutputShard, part_bytes: int) -> list[Part]:
    """Cut a shard's bytes, header included, at every multiple of ``part_bytes``.

    Part ``i`` covers ``[i * part_bytes, (i + 1) * part_bytes)`` of the file; part 0 starts with
    the header (a literal segment). Every part but the last is exactly ``part_bytes`` long, which
    multipart uploads need (each of their parts but the last must be at least 5 MiB).
    """
    parts: list[Part] = []
    ops: list[Segment] = []
    start = pos = 0
    for op in (Segment.literal(out.header), *out.copy_ops()):
        done = 0
        while done < op.length:
            take = min(op.length - done, part_bytes - (pos - start))
            if op.data is not None:
                ops.append(Segment.literal(op.data[done : done + take]))
            else:
                ops.append(Segment(op.shard, op.offset + done, take))
            done += take
            pos += take
            if pos - start == part_bytes:
                parts.append(Part(out.name, len(parts), start, tuple(ops)))
                ops, start = [], pos
    if ops:
        parts.append(Part(out.name, len(parts), start, tuple(ops)))
    return parts


def part_path(dst: Storage, out: OutputShard, plan_digest: str) -> str:
    return dst.local_path(f"{STATE_DIR}/tmp/{out.name}.{plan_digest[:12]}.parts")


def begin_parts(dst: Storage, out: OutputShard, plan_digest: str) -> str:
    """Create the shard's temporary file at full size (part 0 writes the header); returns its path."""
    path = part_path(dst, out, plan_digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, OUTPUT_MODE)
    try:
        with write_errors_are_clear(path):
            os.ftruncate(fd, out.size)
    finally:
        os.close(fd)
    return path


def write_part(
    part: Part, path: str, src: Storage, *, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    progress: Progress | None = None, zero_copy: bool = True,
) -> CopyStats:
    """Fill one part of a preallocated shard file. Idempotent: same bytes, same places."""
    stats = CopyStats()
    copier = RangeCopier(src, buffer_bytes, stats, progress, zero_copy=zero_copy)
    sink = PartOutput(path, part.start)
    try:
        _copy_all(copier, list(part.ops), sink)
    finally:
        sink.abort()
        copier.close()
    return stats


def write_part_multipart(
    part: Part, src: Storage, dst: Storage, upload_id: str, upload_part_bytes: int, *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES, progress: Progress | None = None,
) -> tuple[CopyStats, list[dict[str, Any]]]:
    """Send one part of a shard as numbered parts of its multipart upload. Idempotent: a retry
    sends the same part numbers with the same bytes."""
    stats = CopyStats()
    copier = RangeCopier(src, buffer_bytes, stats, progress, zero_copy=False)
    sink = MultipartPart(dst, part.shard, upload_id, part.start, upload_part_bytes)
    try:
        _copy_all(copier, list(part.ops), sink)
        sink.commit()
    finally:
        copier.close()
    return stats, sink.parts


def commit_parts(dst: Storage, out: OutputShard, path: str, buffer_bytes: int, drop_cache: bool = False) -> str:
    """fsync, hash and publish a shard whose parts are all written; returns its sha256."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with write_errors_are_clear(path):
            os.fsync(fd)
        if os.fstat(fd).st_size != out.size:
            raise ExecutionError(f"{out.name}: assembled {os.fstat(fd).st_size:,} bytes, planned {out.size:,}")
        digest = _sha256_fd(fd, buffer_bytes)
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    final = dst.local_path(out.name)
    os.replace(path, final)
    fsync_dir(os.path.dirname(final))
    return digest


#: How far ahead of the copy the source ranges are requested (page cache, not process memory),
#: in pieces of at most PREFETCH_PIECE.
PREFETCH_WINDOW = 128 << 20
PREFETCH_PIECE = 32 << 20


def _copy_all(copier: RangeCopier, ops: list[Segment],
              sink: LocalOutput | RemoteOutput | PartOutput | MultipartPart) -> None:
    """Copy ops in order, keeping about PREFETCH_WINDOW bytes of upcoming source ranges requested."""
    pieces: list[Segment] = []
    for op in ops:
        if op.data is not None or op.length <= PREFETCH_PIECE:
            pieces.append(op)
            continue
        for start in range(0, op.length, PREFETCH_PIECE):
            pieces.append(Segment(op.shard, op.offset + start, min(PREFETCH_PIECE, op.length - start)))
    ahead = 0  # bytes requested beyond the piece being copied
    j = 0
    for i, piece in enumerate(pieces):
        if j <= i:
            j, ahead = i, 0
        while j < len(pieces) and ahead < PREFETCH_WINDOW:
            nxt = pieces[j]
            if nxt.data is None:
                copier.prefetch(nxt.shard, nxt.offset, nxt.length)
            ahead += nxt.length
            j += 1
        ahead -= piece.length
        if piece.data is not None:
            sink.write(piece.data)
        else:
            copier.copy(piece.shard, piece.offset, piece.length, sink)


def _sha256_fd(fd: int, buffer_bytes: int) -> str:
    h = hashlib.sha256()
    view = memoryview(bytearray(buffer_bytes))
    pos = 0
    while n := os.preadv(fd, [view], pos):
        h.update(view[:n])
        pos += n
    return h.hexdigest()


def hash_file(storage: Storage, name: str, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> str:
    """sha256 of a file, streamed with a bounded buffer."""
    if storage.is_local:
        fd = os.open(storage.local_path(name), os.O_RDONLY)
        try:
            return _sha256_fd(fd, buffer_bytes)
        finally:
            os.close(fd)
    h = hashlib.sha256()
    with storage.fs.open(storage.path(name), "rb", block_size=buffer_bytes) as f:
        while chunk := f.read(buffer_bytes):
            h.update(chunk)
    return h.hexdigest()


# --- destination state ---------------------------------------------------------------------------

def _same_or_inside(a: Storage, b: Storage) -> bool:
    """Whether location ``a`` is ``b`` or lies inside it (same filesystem protocol)."""
    if a.is_local and b.is_local:
        pa, pb = os.path.realpath(a.root), os.path.realpath(b.root)
        return pa == pb or pa.startswith(pb.rstrip(os.sep) + os.sep)
    if type(a.fs) is not type(b.fs):
        return False
    ra, rb = a.root.rstrip("/"), b.root.rstrip("/")
    return ra == rb or ra.startswith(rb + "/")


def put_bytes(dst: Storage, name: str, data: bytes) -> None:
    """Publish a small file atomically (temp name, fsync, rename) or as one object."""
    if not dst.is_local:
        dst.fs.pipe_file(dst.path(name), data)
        return
    final = dst.local_path(name)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp_dir = dst.local_path(f"{STATE_DIR}/tmp")
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = os.path.join(tmp_dir, f"{os.path.basename(name)}.{os.getpid()}.tmp")
    try:
        with write_errors_are_clear(final):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, OUTPUT_MODE)
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(final))


class Journal:
    """Finished shards of one plan in one destination; written by the driving process only."""

    def __init__(self, dst: Storage, plan_digest: str, lock: DestinationLock | None = None):
        self.dst = dst
        self.plan_digest = plan_digest
        self.shards: dict[str, dict[str, Any]] = {}
        self.lock = lock

    @classmethod
    def read(cls, dst: Storage) -> dict[str, Any] | None:
        if not dst.exists(JOURNAL):
            return None
        try:
            return json.loads(dst.read_all(JOURNAL))
        except json.JSONDecodeError:
            return None  # torn by a crash before its rename: treat as absent

    def record(self, result: ShardResult) -> None:
        self.shards[result.name] = {"size": result.size, "sha256": result.sha256}
        self.flush()
        if self.lock:
            self.lock.refresh()

    def flush(self) -> None:
        doc = {"plan": self.plan_digest, "shards": self.shards}
        put_bytes(self.dst, JOURNAL, json.dumps(doc, indent=1, sort_keys=True).encode())


def check_destination(src: Storage, dst: Storage) -> None:
    """Refuse a destination that overlaps the source or is not a folder, before writing anything.

    Raises:
        ExecutionError: destination equal to, inside, or containing the source; a destination
            that is a file, or lies below one.
    """
    if _same_or_inside(dst, src) or _same_or_inside(src, dst):
        raise ExecutionError(
            f"destination {dst.url} is the source {src.url}, inside it, or contains it; the source "
            f"is never modified: choose another destination"
        )
    if dst.is_local:
        path = dst.root
        while not os.path.lexists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            what = "is a file" if path == dst.root else f"lies below {path}, which is a file"
            raise ExecutionError(
                f"destination {dst.url} {what}, not a folder; it is never overwritten, even with "
                f"--force: choose a folder (new or empty) for the output"
            )


def prepare_destination(plan: Plan, dst: Storage, *, force: bool = False,
                        lock: DestinationLock | None = None) -> tuple[Journal, bool]:
    """Check the destination against the plan and load the journal of an interrupted run.
    Call with the destination's lock held.

    Returns:
        The journal, and whether the destination already holds this plan's complete output.

    Raises:
        ExecutionError: a destination holding another plan's output or unrelated files (unless
            ``force``).
    """
    digest = plan.digest
    journal = Journal(dst, digest, lock)
    files = dst.list_files() if dst.fs.exists(dst.root) else []
    state = Journal.read(dst) if files else None
    if state is None and all(f.startswith(STATE_DIR + "/") for f in files):
        return journal, False  # empty, or only the state of a run killed before its journal
    prov_digest = _provenance_digest(dst)
    ours = (state and state.get("plan") == digest) or prov_digest == digest
    if ours:
        if prov_digest == digest and dst.exists(INDEX_NAME) and not dst.exists(JOURNAL):
            return journal, True
        if state and state.get("plan") == digest:
            journal.shards = dict(state.get("shards", {}))
        return journal, False
    if not force:
        what = "output of another plan" if (state or prov_digest) else "files this tool did not write"
        raise ExecutionError(
            f"destination {dst.url} is not empty: it holds {what}; choose an empty destination, "
            f"or pass --force to overwrite it"
        )
    log.warning("--force: clearing earlier output in %s", dst.url)
    _clear_output(dst)
    return journal, False


def _provenance_digest(dst: Storage) -> str | None:
    if not dst.exists(PROVENANCE_NAME):
        return None
    try:
        return json.loads(dst.read_all(PROVENANCE_NAME)).get("plan_digest")
    except (json.JSONDecodeError, AttributeError):
        return None


def _clear_output(dst: Storage) -> None:
    """Remove what marks a destination complete or belongs to an earlier run (``--force``)."""
    for name in (INDEX_NAME, PROVENANCE_NAME, JOURNAL):
        if dst.exists(name):
            dst.fs.rm(dst.path(name))
    for name in dst.list_files():
        if name.endswith(".safetensors") and "/" not in name:
            dst.fs.rm(dst.path(name))


def _shard_done(dst: Storage, name: str, entry: Mapping[str, Any], buffer_bytes: int) -> bool:
    if not dst.exists(name) or dst.size(name) != entry.get("size"):
        return False
    if not dst.is_local:
        return True  # object stores publish only complete uploads
    return hash_file(dst, name, buffer_bytes) == entry.get("sha256")


def pending_shards(plan: Plan, journal: Journal, buffer_bytes: int) -> tuple[list[OutputShard], list[ShardResult]]:
    """Split the plan's shards into those still to write and those the journal vouches for."""
    todo, done = [], []
    for out in plan.outputs:
        entry = journal.shards.get(out.name)
        if entry and _shard_done(journal.dst, out.name, entry, buffer_bytes):
            done.append(ShardResult(out.name, out.size, entry["sha256"], resumed=True))
        else:
            journal.shards.pop(out.name, None)
            todo.append(out)
    return todo, done


def finalize(plan: Plan, src: Storage, dst: Storage, results: Iterable[ShardResult], buffer_bytes: int) -> None:
    """Config, other files and provenance, then the index last, then drop the run state."""
    by_name = {r.name: r for r in results}
    put_bytes(dst, CONFIG_NAME, plan.config_json())
    for name in plan.copy_files:
        if name != CARD_NAME:  # the source's card is kept under another name by write_model_card
            copy_small_file(src, dst, name, buffer_bytes)
    write_model_card(plan, src, dst, buffer_bytes)
    provenance = {
        "format": "moe-rewriter-provenance",
        "plan_digest": plan.digest,
        "source": plan.source_url,
        "family": plan.family,
        "expert_mapping": plan.expert_mapping(),
        "top_k": plan.top_k,
        "skipped_files": list(plan.skipped_files),
        "shards": {o.name: {"size": o.size, "sha256": by_name[o.name].sha256} for o in plan.outputs},
        "plan": plan.to_json(),
    }
    put_bytes(dst, PROVENANCE_NAME, (json.dumps(provenance, indent=1, sort_keys=True) + "\n").encode())
    put_bytes(dst, INDEX_NAME, plan.index_json())
    if dst.exists(STATE_DIR):
        if dst.is_local:
            shutil.rmtree(dst.local_path(STATE_DIR))
        else:
            dst.fs.rm(dst.path(STATE_DIR), recursive=True)


def copy_small_file(src: Storage, dst: Storage, name: str, buffer_bytes: int, dst_name: str | None = None) -> None:
    """Copy a non-tensor file (tokenizer, generation config…) in bounded chunks, atomically,
    to ``dst_name`` (default: the same name)."""
    size = src.size(name)
    out = dst_name or name
    if size <= buffer_bytes:
        put_bytes(dst, out, src.read_all(name))
        return
    if dst.is_local:
        os.makedirs(os.path.dirname(dst.local_path(out)), exist_ok=True)
        sink: LocalOutput | RemoteOutput = LocalOutput(dst, out, dst.local_path(f"{STATE_DIR}/tmp"), buffer_bytes, hash_trailing=False)
    else:
        sink = RemoteOutput(dst, out, buffer_bytes)
    try:
        for start in range(0, size, buffer_bytes):
            sink.write(src.read_range(name, start, min(size, start + buffer_bytes)))
        sink.commit()
    except BaseException:
        sink.abort()
        raise


ShardRunner = Callable[[list[OutputShard], Callable[[ShardResult], None]], None]


def execute(
    plan: Plan,
    dst_url: str,
    *,
    src_options: Mapping[str, Any] | None = None,
    dst_options: Mapping[str, Any] | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    progress: Progress | None = None,
    force: bool = False,
    allow_nonuniform: bool = False,
    zero_copy: bool = True,
    drop_cache: bool = False,
    runner: ShardRunner | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunResult:
    """Carry out ``plan`` into ``dst_url``.

    Args:
        plan: the plan (see :mod:`planners.plan`).
        dst_url: destination directory or fsspec URL.
        buffer_bytes: the copy buffer; bounds the memory of the data path.
        progress: called with each number of bytes copied.
        force: overwrite a destination holding other output.
        allow_nonuniform: execute a plan that stock transformers cannot load.
        zero_copy: use ``copy_file_range`` where both ends are local.
        drop_cache: drop written pages from the page cache after each shard.
        runner: executes the pending shards and reports each result (the Ray executor passes
            one); by default they run here, one after another.
        on_start: called with the bytes still to write once the journal has been checked.

    Raises:
        PlanError: the source changed since planning; a non-uniform plan without permission.
        ExecutionError: destination problems, a short source, a full disk.
    """
    t0 = time.perf_counter()
    if not plan.loadable and not allow_nonuniform:
        raise PlanError(
            "this plan keeps different expert counts per layer, which stock transformers cannot "
            "load; pass --allow-nonuniform to write it anyway"
        )
    src = Storage(plan.source_url, src_options)
    dst = Storage(dst_url, dst_options)
    try:
        ckpt = Checkpoint.open(plan.source_url, storage=src)
        plan.check_source(ckpt)
        check_destination(src, dst)
        created = dst.is_local and not os.path.exists(dst.root)
        lock = DestinationLock(dst)
        with lock:
            try:
                return _execute_locked(plan, src, dst, lock, t0, force=force, buffer_bytes=buffer_bytes,
                                       progress=progress, zero_copy=zero_copy, drop_cache=drop_cache,
                                       runner=runner, on_start=on_start)
            except BaseException:
                _drop_empty_state(dst, created)
                raise
    finally:
        src.close()


def _drop_empty_state(dst: Storage, created: bool) -> None:
    """After a failed (or nothing-to-do) run, remove a state folder holding nothing to resume (only the lock and
    empty temporary folders), and the destination folder itself when this run created it and
    it is empty; a journal stays, so that the same command resumes."""
    if not dst.is_local:
        return
    state = dst.local_path(STATE_DIR)
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs]
    if leftovers and leftovers != [dst.local_path(LOCK_NAME)]:
        return
    shutil.rmtree(state, ignore_errors=True)
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(dst.root)


def _execute_locked(plan: Plan, src: Storage, dst: Storage, lock: DestinationLock, t0: float, *,
                    force: bool, buffer_bytes: int, progress: Progress | None, zero_copy: bool,
                    drop_cache: bool, runner: ShardRunner | None,
                    on_start: Callable[[int], None] | None) -> RunResult:
    journal, complete = prepare_destination(plan, dst, force=force, lock=lock)
    if dst.is_local:
        # Temporary files of killed runs: with the lock held, no other run is writing them.
        shutil.rmtree(dst.local_path(f"{STATE_DIR}/tmp"), ignore_errors=True)
    result = RunResult(dst.url, plan.digest)
    if complete:
        log.info("%s already holds the complete output of this plan", dst.url)
        _drop_empty_state(dst, created=False)  # the lock file this run made
        result.already_complete = True
        result.seconds = time.perf_counter() - t0
        return result
    journal.flush()
    todo, done = pending_shards(plan, journal, buffer_bytes)
    result.shards.extend(done)
    if on_start:
        on_start(sum(o.size for o in todo))

    def record(r: ShardResult) -> None:
        journal.record(r)
        result.shards.append(r)

    if runner is None:
        for out in todo:
            record(write_output_shard(out, src, dst, buffer_bytes=buffer_bytes, progress=progress,
                                      zero_copy=zero_copy, drop_cache=drop_cache))
    else:
        runner(todo, record)
    finalize(plan, src, dst, result.shards, buffer_bytes)
    order = {o.name: i for i, o in enumerate(plan.outputs)}
    result.shards.sort(key=lambda r: order[r.name])
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result
