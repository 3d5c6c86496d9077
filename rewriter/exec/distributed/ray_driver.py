"""The Ray driver's dispatch loop: hands shards and parts to actors, one task per actor at a time.

What it guarantees, in order:

* **Every writer sees the destination.** Before an actor gets work it reads back a probe file the
  driver wrote and writes its own, which the driver reads back; a node that cannot see the
  destination stops the run with its name (before any write when all actors start together).
* **No waiting for the whole cluster.** Work starts with the actors that are placed; one that
  Ray cannot place (no free CPU or memory, a lost node) is reported with how long it has waited
  and, after ``pending_timeout_s``, given up (its work goes to the others), or the run stops
  when no actor could be placed at all.
* **Retries by the driver.** A task whose actor died goes back in the queue (Ray restarts the
  actor, or another takes it), up to ``max_task_retries`` times; the error names the shard or
  part, how many times its worker died, and why. An actor Ray is restarting is probed until it
  answers, within ``pending_timeout_s``; only one Ray has given up on is dropped at once.
* **Progress without a single point of failure.** Busy actors are polled; a failed poll is ignored.
* **Nothing lost on failure.** After an error no new task starts, the tasks in flight finish
  and are journaled, then the error is raised; the same command resumes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from core.errors import ExecutionError, RewriterError
from planners.tensors import OutputShard
from rewriter.exec.distributed.parts import Part
from rewriter.exec.distributed.ray_actors import PROBE_DIR
from rewriter.exec.distributed.ray_assembly import Assemblies

log = logging.getLogger(__name__)

#: One unit of work for an actor: a whole output shard, or a part of a large one.
Task = OutputShard | Part
#: How often a wait for actors to be placed is reported (at least three times per timeout).
PENDING_REPORT_S = 10.0
#: How long work waits for every actor to answer its probe before starting with those that have.
START_GRACE_S = 10.0
#: How often an actor Ray is restarting is probed again.
REPROBE_S = 0.5


def describe(task: Task) -> str:
    return task.describe() if isinstance(task, Part) else f"shard {task.name}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@dataclass
class Slot:
    """One actor, as the driver sees it."""

    actor: Any
    since: float
    probe: Any = None  # the pending probe's ref, until the actor has answered it
    where: dict[str, str] | None = None
    task: Task | None = None
    ref: Any = None
    poll: Any = None
    seen: int = 0
    reported: float = 0.0
    gone: bool = False
    reprobe_at: float | None = None  # when to probe again an actor Ray is restarting

    @property
    def name(self) -> str:
        w = self.where or {}
        return f"node {w.get('ip', '?')} ({w.get('host', '?')}, node id {w.get('node', '?')[:12]})"


@dataclass
class Driver:
    """Runs tasks on ``actors``; see the module's docstring."""

    asm: Assemblies
    actors: list[Any]
    token: str
    upload_part_bytes: int
    max_task_retries: int
    pending_timeout_s: float
    memory_bytes: int
    progress: Callable[[int], None] | None
    slots: list[Slot] = field(default_factory=list)
    queue: deque[Task] = field(default_factory=deque)
    deaths: dict[str, int] = field(default_factory=dict)
    failure: BaseException | None = None
    started_any: bool = False
    ever_ready: bool = False
    done_bytes: int = 0
    shown: int = 0
    last_death: str = ""

    def run(self, tasks: list[Task]) -> None:
        now = time.monotonic()
        self.slots = [Slot(a, now, a.probe.remote(self.token)) for a in self.actors]
        self.queue.extend(tasks)
        # Actors placed at once all prove they see the destination before any of them writes; one
        # that takes longer does not hold the others back.
        grace = now + min(self.pending_timeout_s, START_GRACE_S)
        while self.queue or any(s.task for s in self.slots):
            if self.failure is not None and not any(s.task for s in self.slots):
                break
            if self.failure is None and (time.monotonic() > grace or all(s.probe is None for s in self.slots)):
                self._dispatch()
            self._wait()
            self._reprobe()
            self._poll()
            self._check_pending()
            self._show_progress()
        if self.failure is not None:
            raise self.failure

    def _dispatch(self) -> None:
        for s in self.slots:
            if not self.queue:
                return
            if s.gone or s.probe is not None or s.reprobe_at is not None or s.task is not None:
                continue
            task = self.queue.popleft()
            s.task, s.seen, self.started_any = task, 0, True
            if isinstance(task, OutputShard):
                s.ref = s.actor.write_shard.remote(task)
            else:
                s.ref = s.actor.write_part.remote(task, self.asm.handle(task.shard), self.upload_part_bytes)

    def _wait(self) -> None:
        refs = [r for s in self.slots for r in (s.ref, s.probe) if r is not None]
        if not refs:
            time.sleep(0.1)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=0.25, fetch_local=True)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=True)
        done = set(ready)
        for s in self.slots:
            if s.probe is not None and s.probe in done:
                self._probed(s)
            elif s.ref is not None and s.ref in done:
                self._finished(s)

    def _probed(self, s: Slot) -> None:
        ref, s.probe = s.probe, None
        try:
            s.where = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self.last_death = _first_line(e)
            if _restarting(e):
                # Ray restarts it (max_restarts=-1), perhaps on another node: waited for like an
                # actor being placed, bounded by pending_timeout_s in _check_pending.
                s.reprobe_at = time.monotonic() + REPROBE_S
                return
            s.gone = True
            log.warning("a Ray actor could not start: %s", self.last_death)
            if all(x.gone for x in self.slots) and self.failure is None:
                what = "no Ray actor ever started" if not self.ever_ready else "every Ray actor is gone"
                self.failure = ExecutionError(f"{what}: {self.last_death}")
            return
        self.ever_ready = True
        self._check_probe(s)

    def _check_probe(self, s: Slot) -> None:
        w = s.where or {}
        dst = self.asm.dst
        if "error" not in w:
            try:
                dst.storage.invalidate_cache()
                if dst.exists(w["probe"]) and dst.read_all(w["probe"]) == w["node"].encode():
                    return
            except Exception as e:  # named below with the node
                w["error"] = f"{type(e).__name__}: {e}"
            else:
                w["error"] = f"the file it wrote ({dst.describe(w['probe'])}) is not there for the driver"
        if self.failure is None:
            done = "no shard was written" if not self.started_any else "shards finished so far are kept"
            self.failure = ExecutionError(
                f"the Ray actor on {s.name} does not see the destination {dst.url} the driver sees: {w['error']}; "
                f"every node that writes must reach the same destination (an object store, or a shared "
                f"filesystem mounted at the same path on every node); {done}")
        s.gone = True

    def _finished(self, s: Slot) -> None:
        task, ref = s.task, s.ref
        assert task is not None
        s.task = s.ref = None
        try:
            res = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            err = cause if isinstance(cause, RewriterError) else \
                ExecutionError(f"writing {describe(task)} failed: {_first_line(cause or e)}")
            self.failure = self.failure or err
            return
        except ray.exceptions.RayActorError as e:
            self._died(s, task, e)
            return
        self.done_bytes += task.length if isinstance(task, Part) else task.size
        s.seen = 0
        try:
            self.asm.collect(res, s.name)
        except RewriterError as e:
            self.failure = self.failure or e

    def _died(self, s: Slot, task: Task, e: BaseException) -> None:
        try:
            self.asm.discard_attempt(task, (s.where or {}).get("pid"))
        except Exception as err:  # the next run, or `rewriter cleanup`, removes it
            log.warning("could not remove what the dead attempt at %s left: %s", describe(task), err)
        key = describe(task)
        self.deaths[key] = n = self.deaths.get(key, 0) + 1
        self.last_death = _first_line(e)
        if n > self.max_task_retries:
            self.failure = self.failure or ExecutionError(
                f"{key}: the Ray worker writing it died {n} time{'s' if n > 1 else ''} (last on {s.name}: "
                f"{self.last_death}); the shards finished so far are kept: run the same command again to resume")
        else:
            log.warning("the Ray worker writing %s on %s died (%s); retrying (%d of %d)", key, s.name,
                        self.last_death, n, self.max_task_retries)
            self.queue.appendleft(task)
        # Ray restarts the actor, perhaps on another node: it proves again that it sees the destination.
        s.probe, s.since, s.where = s.actor.probe.remote(self.token), time.monotonic(), None

    def _reprobe(self) -> None:
        now = time.monotonic()
        for s in self.slots:
            if s.reprobe_at is not None and now >= s.reprobe_at and not s.gone:
                s.reprobe_at, s.probe = None, s.actor.probe.remote(self.token)

    def _poll(self) -> None:
        polls = [s.poll for s in self.slots if s.poll is not None]
        ready = set(ray.wait(polls, num_returns=len(polls), timeout=0)[0]) if polls else set()
        for s in self.slots:
            if s.poll is not None and s.poll in ready:
                try:
                    s.seen = int(ray.get(s.poll)) if s.task is not None else 0
                except ray.exceptions.RayError:
                    pass  # the write's own result says what happened to the actor
                s.poll = None
            if s.poll is None and s.task is not None:
                s.poll = s.actor.progress.remote()

    def _check_pending(self) -> None:
        now = time.monotonic()
        waiting = [s for s in self.slots if (s.probe is not None or s.reprobe_at is not None) and not s.gone]
        if not waiting:
            return
        oldest = min(s.since for s in waiting)
        if now - max(oldest, max(s.reported for s in waiting)) >= min(PENDING_REPORT_S, self.pending_timeout_s / 3):
            for s in waiting:
                s.reported = now
            log.warning("waiting %.0f s for %d of %d Ray actors to be placed (each needs 1 CPU and %d MiB of "
                        "memory; %s); giving up after %.0f s (--ray-pending-timeout)",
                        now - oldest, len(waiting), len(self.slots), self.memory_bytes >> 20,
                        _available(), self.pending_timeout_s)
        ready = [s for s in self.slots if s.where is not None and not s.gone]
        for s in waiting:
            if now - s.since < self.pending_timeout_s:
                continue
            if not ready and self.failure is None:
                self.failure = ExecutionError(
                    f"no Ray actor could be placed within {self.pending_timeout_s:g} s: {len(waiting)} actors each "
                    f"need 1 CPU and {self.memory_bytes >> 20} MiB of memory on one node, and the cluster has "
                    f"{_available()}; lower --workers, add nodes, or wait longer with --ray-pending-timeout")
                for x in waiting:
                    x.gone, x.probe, x.reprobe_at = True, None, None
                return
            if ready:
                log.warning("gave up a Ray actor not placed within %.0f s; %d running actors take its work",
                            self.pending_timeout_s, len(ready))
                s.gone, s.probe, s.reprobe_at = True, None, None
                ray.kill(s.actor, no_restart=True)

    def _show_progress(self) -> None:
        if self.progress:
            total = self.done_bytes + sum(s.seen for s in self.slots if s.task is not None)
            if total > self.shown:
                self.progress(total - self.shown)
                self.shown = total


def _restarting(e: BaseException) -> bool:
    """Whether the actor of a failed call may answer again: Ray is restarting it (or its node
    is not reachable yet), rather than having given it up or failed to construct it."""
    if isinstance(e, ray.exceptions.ActorUnavailableError) or getattr(e, "actor_init_failed", False):
        return not getattr(e, "actor_init_failed", False)
    return any(word in str(e).lower() for word in ("restart", "connection refused"))


def _available() -> str:
    """What the node with the most free memory (among those with a free CPU) has: an actor is
    placed on one node, so a sum over the cluster would promise room no node has. Ray's figures
    trail its nodes (recent actors may not show yet): the message says whose figures they are."""
    from ray._private.state import available_resources_per_node

    try:
        nodes = list(available_resources_per_node().values())
    except Exception:  # only for the message
        return "no node whose free CPU and memory could be read"
    if not nodes:
        return "no live node"
    best = max(nodes, key=lambda r: (r.get("CPU", 0) >= 1, r.get("memory", 0)))
    return (f"{len(nodes)} node{'s' if len(nodes) > 1 else ''}, the most free on any one of them "
            f"{best.get('CPU', 0):g} CPU and {int(best.get('memory', 0)) >> 20} MiB (as Ray last reported them)")


def remove_probes(dst: Any) -> None:
    try:
        if dst.exists(PROBE_DIR):
            dst.storage.remove(PROBE_DIR, recursive=True)
    except Exception as e:  # state folder; removed with the rest at the end of the run
        log.debug("could not remove %s: %s", PROBE_DIR, e)
