"""The status document: how far a run has got, readable by anyone who can read the destination.

A run keeps ``DST/.rewriter/status.json`` up to date (published whole, at most every
:data:`WRITE_EVERY_S` seconds, and at once when it starts, publishes a shard, fails or is
interrupted): its state (``running``, ``failed``, ``interrupted``), bytes, shards and (Ray) parts done and in all, when it started, its rate (since the first bytes
were reported), an ETA and the last error. The state folder is removed when the output is complete, so a finished run is read from
the output itself: its index and ``pruning.json``. A driver killed outright cannot say so: a
``running`` document whose driver ran on this host and is gone (or whose pid is now another
process's) is read as ``stopped``, with the shards and bytes its journal vouches for.

:class:`StatusWriter` is the run's observer (``execute(observer=...)``) and a progress callback;
:func:`read_status` is what ``rewriter status`` shows.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from core import jsonfile
from core.checkpoint import INDEX_NAME
from core.errors import DestinationFullError, ExecutionError
from core.gguf_model import INDEX_NAME as GGUF_INDEX_NAME
from planners.plan import PROVENANCE_NAME, Plan
from rewriter.exec.dest.base import Destination
from rewriter.exec.dest.destination import open_destination
from rewriter.exec.dest.journal import JOURNAL, ShardResult
from rewriter.exec.dest.lock import STATE_DIR
from rewriter.exec.io import Throttle

log = logging.getLogger(__name__)

STATUS_NAME = f"{STATE_DIR}/status.json"
FORMAT = "moe-rewriter-status"
#: The document is published at most this often while bytes flow.
WRITE_EVERY_S = 2.0
#: A running run whose document is older than this is reported as possibly stopped.
STALE_AFTER_S = 120.0
#: How much later than the run a process may seem to start and still be its driver (the clock of
#: ``/proc`` start times counts from a boot time rounded to the second, and drifts).
PID_CLOCK_SLACK_S = 5.0
INTERRUPTED_NOTE = "interrupted; run the same command again to resume"
CLEANED_NOTE = ("`rewriter cleanup` discarded the parts and temporaries of unfinished shards; the finished "
                "shards are kept: run the same command again to resume")
STOPPED_NOTE = ("its driver (process {pid} on this host) is no longer running: it was killed; run the same "
                "command again to resume")


class RunObserver(Protocol):
    """What a run tells an observer (``execute(observer=...)``); bytes come by the progress callback."""

    def started(self, dst: Destination, plan: Plan, done: list[ShardResult]) -> None: ...

    def shard_done(self, result: ShardResult) -> None: ...

    def failed(self, err: BaseException) -> None: ...


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class StatusWriter:
    """Keeps a run's status document; never lets a failure to write it stop the run."""

    def __init__(self, every_s: float = WRITE_EVERY_S, clock: Callable[[], float] = time.time):
        self.dst: Destination | None = None
        self.clock = clock
        self.throttle = Throttle(every_s)
        self.doc: dict[str, Any] = {}
        self.t0 = 0.0
        self.base = 0  # bytes already in place when the run started (resumed shards)
        self.copied = 0
        # The rate counts from the first progress report (workers may take a while to start, and
        # report in lumps): bytes after it over the time since it.
        self.first: tuple[float, int] | None = None
        self.warned = False
        self.lock = threading.Lock()  # progress may come from several threads

    def started(self, dst: Destination, plan: Plan, done: list[ShardResult]) -> None:
        """The run checked its journal; ``done`` are the shards it vouches for."""
        self.dst, self.t0 = dst, self.clock()
        self.base = sum(r.size for r in done)
        self.doc = {"format": FORMAT, "state": "running", "dst": dst.url, "plan_digest": plan.digest,
                    "host": socket.gethostname(), "pid": os.getpid(), "started": _iso(self.t0),
                    "started_unix": round(self.t0, 3),
                    "bytes_total": sum(o.size for o in plan.outputs), "shards_total": len(plan.outputs),
                    "shards_done": len(done), "shards_resumed": len(done), "error": None}
        self._write(force=True)

    def __call__(self, n: int) -> None:
        """Progress: ``n`` more bytes copied."""
        self._write(n)

    def parts(self, done: int, total: int) -> None:
        """Shards written in parts (Ray): ``done`` of ``total`` parts are in."""
        if self.dst is not None:
            self.doc.update(parts_done=done, parts_total=total)
            self._write()

    def shard_done(self, result: ShardResult) -> None:
        if self.dst is not None:
            self.doc["shards_done"] += 1
            self._write(force=True)

    def failed(self, err: BaseException) -> None:
        if self.dst is not None:
            if isinstance(err, KeyboardInterrupt):
                self.doc.update(state="interrupted", note=INTERRUPTED_NOTE)
            else:
                self.doc.update(state="failed", error=str(err) or type(err).__name__)
            self._write(force=True)

    def _write(self, copied: int = 0, force: bool = False) -> None:
        with self.lock:
            self.copied += copied
            now = self.clock()
            if copied and self.first is None:
                self.first = (now, self.copied)
            if self.dst is not None and (self.throttle.due(now) or force):
                self._publish(now)

    def _publish(self, now: float) -> None:
        assert self.dst is not None
        elapsed = max(now - self.t0, 1e-9)
        total = self.doc["bytes_total"]
        done = min(total, self.base + self.copied)
        rate = None
        if self.first is not None and now > self.first[0] and self.copied > self.first[1]:
            rate = (self.copied - self.first[1]) / (now - self.first[0])
        self.doc.update(bytes_done=done, updated=_iso(now), updated_unix=round(now, 3), seconds=round(elapsed, 3),
                        rate_bytes_per_s=round(rate) if rate else None,
                        eta_s=round((total - done) / rate, 1) if rate and self.doc["state"] == "running" else None)
        try:
            self.dst.put_bytes(STATUS_NAME, (json.dumps(self.doc, indent=1, sort_keys=True) + "\n").encode())
        except DestinationFullError:
            pass  # the run's own writes meet the full disk too, and its error says so and what to do
        except Exception as e:  # the run matters more than its status document
            if not self.warned:
                log.warning("could not write the status document %s (%s); the run goes on",
                            self.dst.describe(STATUS_NAME), e)
                self.warned = True


def read_status(dst_url: str, options: Mapping[str, Any] | None = None, now: float | None = None) -> dict[str, Any]:
    """The state of the run writing ``dst_url``: its status document, or ``complete`` from a
    finished output (index and ``pruning.json``, no journal).

    Raises:
        ExecutionError: nothing there was written by a run, or the status document is damaged.
    """
    dst = open_destination(dst_url, options)
    if (dst.exists(INDEX_NAME) or dst.exists(GGUF_INDEX_NAME)) and dst.exists(PROVENANCE_NAME) and not dst.exists(JOURNAL):
        return _complete(dst)
    if dst.exists(STATUS_NAME):
        return _stopped(dst, _checked(dst, dst.read_all(STATUS_NAME), time.time() if now is None else now))
    if dst.exists(JOURNAL):
        return {"format": FORMAT, "state": "unknown", "dst": dst.url,
                "note": "a run's journal is there but no status document: the run was started by a "
                        "version that keeps none, or stopped before its first update"}
    raise ExecutionError(f"{dst.url} holds no output and no run state of this tool: check the destination "
                         f"(and --dst-options), or the run has not started writing yet")


def _complete(dst: Destination) -> dict[str, Any]:
    try:
        prov = jsonfile.loads(dst.read_all(PROVENANCE_NAME))
        shards = prov["shards"]
        total = sum(int(s["size"]) for s in shards.values())
        digest = str(prov["plan_digest"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ExecutionError(f"{dst.describe(PROVENANCE_NAME)} is not a provenance file of this tool; "
                             f"the output is not one `rewriter run` wrote") from None
    return {"format": FORMAT, "state": "complete", "dst": dst.url, "plan_digest": digest, "bytes_total": total,
            "bytes_done": total, "shards_total": len(shards), "shards_done": len(shards), "error": None}


_FIELDS: dict[str, tuple[type, ...]] = {
    "state": (str,), "bytes_total": (int,), "bytes_done": (int,), "shards_total": (int,), "shards_done": (int,),
    "started": (str,), "updated": (str,), "updated_unix": (int, float),
}


def _checked(dst: Destination, raw: bytes, now: float) -> dict[str, Any]:
    """The status document, its fields checked (it is read back from storage anyone can write)."""
    try:
        doc = jsonfile.loads(raw)
        ok = isinstance(doc, dict) and doc.get("format") == FORMAT and all(
            isinstance(doc.get(k), t) for k, t in _FIELDS.items())
    except ValueError:
        ok = False
    if not ok:
        raise ExecutionError(f"{dst.describe(STATUS_NAME)} is not a status document of this tool (torn or "
                             f"edited); the run's next update replaces it")
    age = now - doc["updated_unix"]
    if doc["state"] == "running" and age > STALE_AFTER_S:
        doc["stale_s"] = round(age)
    return dict(doc)


def _process_started(pid: int) -> float | None:
    """When process ``pid`` of this host started (Unix time), or None: no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError, StopIteration):  # no /proc: only whether it is alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0


def _stopped(dst: Destination, doc: dict[str, Any]) -> dict[str, Any]:
    """A ``running`` document whose driver ran here and is gone (or its pid is another process,
    started after the run) is ``stopped``; its counts then come from the journal."""
    pid = doc.get("pid")
    if doc["state"] != "running" or doc.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return doc
    started = _process_started(pid)
    run_started = doc.get("started_unix")
    if not isinstance(run_started, (int, float)):  # a document of an earlier version: the update time bounds it
        run_started = doc["updated_unix"]
    if started is not None and started <= run_started + PID_CLOCK_SLACK_S:
        return doc  # that process started before the run did: it is the driver
    doc.update(state="stopped", note=STOPPED_NOTE.format(pid=pid), eta_s=None, rate_bytes_per_s=None)
    doc.pop("stale_s", None)
    journaled = _journaled(dst)
    if journaled is not None:
        doc["shards_done"] = max(doc["shards_done"], journaled[0])
        doc["bytes_done"] = max(doc["bytes_done"], min(doc["bytes_total"], journaled[1]))
    return doc


def _journaled(dst: Destination) -> tuple[int, int] | None:
    """Shards and bytes the destination's journal vouches for (None: no readable journal)."""
    try:
        shards = jsonfile.loads(dst.read_all(JOURNAL)).get("shards") if dst.exists(JOURNAL) else None
    except (ValueError, AttributeError):
        shards = None
    if not isinstance(shards, dict):
        return None
    sizes = [r.get("size") for r in shards.values() if isinstance(r, dict)]
    return len(shards), sum(n for n in sizes if isinstance(n, int))


def record_cleanup(dst: Destination) -> None:
    """After ``rewriter cleanup`` discarded the parts and temporaries of unfinished shards, the
    status document counts only what the journal keeps: the finished shards and their bytes, no
    parts. Called with the destination's lock held (no run is writing the document)."""
    if not dst.exists(STATUS_NAME):
        return
    try:
        doc = _checked(dst, dst.read_all(STATUS_NAME), time.time())
    except ExecutionError:
        return  # a damaged document is reported by `status` as such; the next run replaces it
    shards, size = _journaled(dst) or (0, 0)
    doc = {k: v for k, v in doc.items() if k not in ("parts_done", "parts_total", "stale_s")}
    doc.update(shards_done=min(shards, doc["shards_total"]), bytes_done=min(size, doc["bytes_total"]), eta_s=None,
               rate_bytes_per_s=None, note=CLEANED_NOTE)
    if doc["state"] == "running":  # its driver is gone: cleanup could take the lock
        doc["state"] = "stopped"
    dst.put_bytes(STATUS_NAME, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def format_status(doc: Mapping[str, Any]) -> list[str]:
    """Lines for a person: state, bytes, shards, rate and ETA, the error."""
    from planners.cost import human_bytes

    lines = [f"state:      {doc['state']}"]
    if doc.get("note"):
        lines.append(f"note:       {doc['note']}")
    if "bytes_total" in doc and "bytes_done" in doc:
        total, done = doc["bytes_total"], doc["bytes_done"]
        lines.append(f"bytes:      {human_bytes(done)} of {human_bytes(total)} ({done / total:.1%})" if total else
                     "bytes:      0 B")
        lines.append(f"shards:     {doc['shards_done']} of {doc['shards_total']}"
                     + (f" ({doc['shards_resumed']} resumed)" if doc.get("shards_resumed") else ""))
        if isinstance(doc.get("parts_total"), int) and isinstance(doc.get("parts_done"), int) and doc["parts_total"]:
            lines.append(f"parts:      {doc['parts_done']} of {doc['parts_total']} (of the shards written in parts)")
    if doc.get("started"):
        lines.append(f"started:    {doc['started']} on {doc.get('host', '?')} (pid {doc.get('pid', '?')}), "
                     f"updated {doc.get('updated')}")
    if doc["state"] == "running":
        rate, eta = doc.get("rate_bytes_per_s"), doc.get("eta_s")
        lines.append(f"rate:       {human_bytes(rate)}/s, ETA {eta:.0f} s" if isinstance(rate, int) and isinstance(eta, (int, float))
                     else "rate:       not known yet (too few bytes written), ETA unknown")
    if doc.get("stale_s"):
        lines.append(f"warning:    no update for {doc['stale_s']} s: the run may have stopped (a killed driver "
                     f"cannot say so); run the same command again to resume it")
    if doc.get("error"):
        lines.append(f"error:      {doc['error']}")
    return lines
