"""Ray Jobs, as ``rewriter submit``/``status``/``logs`` use them (``ray.job_submission``).

A job runs ``python -m ray_jobs.rewrite PLAN --out DST ...`` (``rewriter run --ray`` on the
cluster) with the plan sent along: the job's working folder holds nothing but the plan (and the
sidecar of a plan's carried bytes, :mod:`planners.carried_file`), so a plan
on the submitter's laptop reaches the cluster; the package itself must be installed on every
node. The job's metadata names the destination and the plan digest, which is how ``status``
finds the run's status document.

Every call to the job service is bounded by a timeout (the client library has none).
"""

from __future__ import annotations

import logging
import os
import shlex
import tempfile
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from core.errors import ExecutionError

log = logging.getLogger(__name__)

#: Metadata keys of a submitted job.
META_DST, META_DIGEST, META_PLAN = "rewriter_dst", "rewriter_plan_digest", "rewriter_plan"
#: Name of the plan in the job's working folder.
PLAN_NAME = "plan.json"
DEFAULT_TIMEOUT_S = 30.0
ENTRY = ["python", "-m", "ray_jobs.rewrite"]
T = TypeVar("T")


def job_service_address(address: str | None) -> str:
    """``http://HEAD:8265`` from ``--address`` or ``RAY_API_SERVER_ADDRESS`` (scheme optional)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise ExecutionError("no Ray job service given: pass --address http://HEAD:8265 (the head node's "
                             "dashboard) or set RAY_API_SERVER_ADDRESS")
    return address if "://" in address else f"http://{address}"


class JobService:
    """The job service at ``address``; each call is given up after ``timeout_s`` seconds."""

    def __init__(self, address: str | None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.address = job_service_address(address)
        self.timeout_s = timeout_s
        from ray.job_submission import JobSubmissionClient

        # Ray's job client logs "Uploading package ..." at INFO on every submit (its modules set
        # their own level when imported, so this comes after the import).
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                     "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self.client: Any = self._call(lambda: JobSubmissionClient(self.address), "connect")

    def _call(self, fn: Callable[[], T], what: str, job: str | None = None) -> T:
        out: list[Any] = []
        failed: list[BaseException] = []

        def target() -> None:
            try:
                out.append(fn())
            except BaseException as e:  # reported by the caller's thread
                failed.append(e)

        thread = threading.Thread(target=target, name=f"ray-jobs-{what}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            raise ExecutionError(f"the Ray job service at {self.address} did not answer within {self.timeout_s:g} s "
                                 f"({what}); {self._hint()}, or wait longer with --timeout")
        if failed:
            raise self._explain(failed[0], what, job) from None
        return out[0]  # type: ignore[no-any-return]

    def _hint(self) -> str:
        return (f"check that the cluster's head node runs its dashboard (ray start --head --include-dashboard "
                f"true) and that {self.address} is its address (http://HEAD:8265 by default)")

    def _explain(self, e: BaseException, what: str, job: str | None) -> Exception:
        text = str(e)
        if type(e).__name__ == "AuthenticationError":
            return ExecutionError(f"the Ray cluster at {self.address} requires a token: set RAY_AUTH_MODE=token and "
                                  f"RAY_AUTH_TOKEN (or the token file ~/.ray/auth_token) to the cluster's token")
        if job and "404" in text and "does not exist" in text:
            return ExecutionError(f"no job {job!r} on the Ray cluster at {self.address}; `ray job list --address "
                                  f"{self.address}` lists its jobs")
        if isinstance(e, ConnectionError) or "Failed to connect" in text or "Connection" in type(e).__name__:
            return ExecutionError(f"cannot reach the Ray job service at {self.address} ({text.splitlines()[0] if text else type(e).__name__}); "
                                  f"{self._hint()}")
        return ExecutionError(f"the Ray job service at {self.address} refused to {what}: {text.strip()[:500]}")

    def submit(self, write_plan: Callable[[str], None], run_args: list[str], metadata: dict[str, str],
               submission_id: str | None = None) -> str:
        """Submit ``python -m ray_jobs.rewrite plan.json RUN_ARGS``; returns the job id.
        ``write_plan(path)`` writes the plan there (with its carried bytes' sidecar beside it)."""
        entrypoint = shlex.join([*ENTRY, PLAN_NAME, *run_args])
        with tempfile.TemporaryDirectory(prefix="rewriter-job-") as folder:
            write_plan(os.path.join(folder, PLAN_NAME))
            return str(self._call(lambda: self.client.submit_job(
                entrypoint=entrypoint, runtime_env={"working_dir": folder}, metadata=metadata,
                submission_id=submission_id), "submit the job"))

    def info(self, job: str) -> dict[str, Any]:
        """The job's status, message, metadata, entrypoint and times."""
        d = self._call(lambda: self.client.get_job_info(job), "describe the job", job)
        return {"job_id": job, "status": str(getattr(d.status, "value", d.status)), "message": d.message,
                "entrypoint": d.entrypoint, "metadata": dict(d.metadata or {}),
                "start_time": d.start_time, "end_time": d.end_time}

    def logs(self, job: str) -> str:
        return str(self._call(lambda: self.client.get_job_logs(job), "send the job's logs", job))

    def follow(self, job: str, write: Callable[[str], None]) -> None:
        """Write the job's logs as they come, until it ends (no timeout: a job may run for hours)."""
        import asyncio

        self.info(job)  # an unknown job is named, not waited for

        async def tail() -> None:
            async for lines in self.client.tail_job_logs(job):
                write(lines)

        asyncio.run(tail())


#: How many of the last log lines say why a job ended that printed no ``error:`` line.
CAUSE_LINES = 3


def last_error(logs: str) -> str | None:
    """The last ``error:`` line a command printed in the job's logs."""
    lines = [ln[len("error:"):].strip() for ln in logs.splitlines() if ln.startswith("error:")]
    return lines[-1] if lines else None


def failure_cause(logs: str, message: str | None) -> str | None:
    """Why an ended job failed: its last ``error:`` line, or, for a job that ended before the
    command could print one (the cluster's ``python`` lacks the package, a crash), the last
    lines of its logs (a traceback's last line names the exception), or Ray's message."""
    error = last_error(logs)
    if error:
        return error
    tail = [ln.strip() for ln in logs.splitlines() if ln.strip()][-CAUSE_LINES:]
    if tail:
        return "the job ended before the run could report an error; its last log lines: " + " | ".join(tail)
    return message.strip() if message and message.strip() else None


def refused_as_locked(job: dict[str, Any]) -> bool:
    """Whether the job's command ended with exit status 75: the destination was locked by
    another run, so nothing in the destination is this job's."""
    text = f"{job.get('message') or ''}\n{job.get('error') or ''}"
    return "exit code 75" in text or " is in use: " in text
