"""``rewriter submit``, ``status`` and ``logs``: runs as Ray Jobs on a cluster's job service.

``submit`` takes the run command's own options (copied from it when the commands are
registered, so the two cannot drift) and forwards them to the job entry point
``python -m ray_jobs.rewrite``, which is ``rewriter run --ray``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any

import click

from rewriter.cli.errors import EXIT_FOUND, EXIT_OK, RewriterCommand
from rewriter.cli.errors import fail_cleanly as _fail_cleanly
from rewriter.cli.params import JSON_OBJECT, finite, per_layer_plan_note

#: Options of ``run`` that ``submit`` does not forward: the job always runs on Ray, on the
#: cluster it was submitted to.
NOT_FORWARDED = ("ray", "address")
#: Ray job states after which nothing more happens.
JOB_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")

address_option = click.option("--address", default=None, metavar="URL",
                              help="The cluster's job service, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS).")
timeout_option = click.option("--timeout", type=finite(0, 3600, min_open=True), default=30,
                              show_default=True, help="Seconds to wait for the job service to answer.")


def forwarded_args(params: list[click.Parameter], values: dict[str, Any]) -> list[str]:
    """The command line that gives ``values`` to the options ``params`` (arguments excluded)."""
    argv: list[str] = []
    for p in params:
        if not isinstance(p, click.Option) or p.name in NOT_FORWARDED or p.name not in values:
            continue
        value = values[p.name]
        if p.is_flag:
            argv += [p.opts[0]] if value else []
        elif value is not None:
            for v in value if p.multiple else [value]:
                argv += [p.opts[0], json.dumps(v) if isinstance(v, dict) else str(v)]
    return argv


def _submit_command(run: click.Command) -> click.Command:
    params = [copy.copy(p) for p in run.params if p.name not in NOT_FORWARDED]

    @_fail_cleanly
    def submit(plan_file: str, dst: str, address: str | None, timeout: float, submission_id: str | None,
               **kw: Any) -> None:
        from planners.plan import Plan
        from rewriter.tools.jobs import META_DIGEST, META_DST, META_PLAN, JobService

        p = Plan.load(plan_file)
        if p.is_dry_run:
            raise click.UsageError(per_layer_plan_note(plan_file))
        if "://" not in dst and not os.path.isabs(dst):
            raise click.BadParameter(f"{dst} is a relative path, which means nothing on the cluster: give an "
                                     f"absolute path on storage every node shares, or a URL (s3://...)",
                                     param_hint="--out")
        service = JobService(address, timeout)
        run_args = ["--out", dst, *forwarded_args(params, kw)]
        job = service.submit(p.save, run_args,
                             {META_DST: dst, META_DIGEST: p.digest, META_PLAN: plan_file}, submission_id)
        if kw.get("as_json"):
            click.echo(json.dumps({"job_id": job, "address": service.address, "dst": dst, "plan_digest": p.digest}))
            return
        click.echo(job)
        click.echo(f"submitted to {service.address}: {p.digest[:12]} into {dst}; follow it with `rewriter status "
                   f"{job} --address {service.address}` or `rewriter logs {job} --address {service.address} --follow`",
                   err=True)

    extra = [click.Option(["--submission-id"], default=None, help="The job's id (default: one Ray makes up)."),
             *(_decorated_params(address_option, timeout_option))]
    return RewriterCommand(
        "submit", callback=submit, params=[*params, *extra],
        help="Run PLAN into --out as a Ray Job on the cluster at --address; print the job id.\n\n"
             "The job runs `python -m ray_jobs.rewrite` (`rewriter run --ray`) with the options given here, "
             "which are run's. The plan is sent with the job; the package must be installed on the "
             "cluster's nodes, and --out must be storage every node reaches (a shared folder, s3://...).",
    )


def _decorated_params(*decorators: Any) -> list[click.Parameter]:
    def f() -> None: ...

    for d in decorators:
        f = d(f)
    return list(reversed(getattr(f, "__click_params__", [])))


def _is_destination(target: str) -> bool:
    return "://" in target or os.sep in target or os.path.exists(target)


def _refuse_non_job_id(target: str) -> None:
    """A Ray job id (``raysubmit_...`` or one given with --submission-id) holds no ``/``."""
    if not target or "/" in target or os.sep in target or target.strip() != target:
        raise click.BadParameter(f"{target!r} is not a Ray job id (raysubmit_... or the --submission-id given to "
                                 f"`rewriter submit`; ids hold no '/'); for the status of a destination "
                                 f"folder, leave out --address", param_hint="JOB")


def _run_state(dst: str, dst_options: dict[str, Any] | None, job: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """The run's status document, or why it cannot be had (for a job, reading may fail quietly)."""
    from core.errors import RewriterError
    from rewriter.exec.dest import read_status

    try:
        return read_status(dst, dst_options or {}), None
    except (RewriterError, OSError) as e:
        if job is None:
            raise
        return None, f"cannot read the run's status at {dst}: {e}"


def _job_lines(job: dict[str, Any]) -> list[str]:
    meta = job["metadata"]
    lines = [f"job:        {job['job_id']} {job['status']}" + (f" ({job['message'].splitlines()[0]})" if job.get("message") else "")]
    if meta.get("rewriter_dst"):
        lines.append(f"into:       {meta['rewriter_dst']} (plan {str(meta.get('rewriter_plan_digest', '?'))[:12]})")
    if job.get("error"):
        lines.append(f"job error:  {job['error']}")
    if job.get("refused"):
        lines.append(f"refused:    {job['refused']}")
    return lines


def _failed(job: dict[str, Any] | None, doc: dict[str, Any] | None) -> bool:
    return bool((job and job["status"] in ("FAILED", "STOPPED")) or (doc and doc.get("state") in ("failed", "stopped")))


@click.command(cls=RewriterCommand)
@click.argument("target", metavar="JOB|DST")
@address_option
@timeout_option
@click.option("--dst-options", type=JSON_OBJECT, default=None, help="fsspec options for the destination as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the job and the run's status document as JSON.")
@_fail_cleanly
def status(target: str, address: str | None, timeout: float, dst_options: dict[str, Any] | None, as_json: bool) -> None:
    """Progress of a run: a Ray job (with --address) or a destination DST (no cluster needed).

    With --address, the argument is always a job id (raysubmit_... or the --submission-id given to
    `submit`), never a path. Without it, an argument holding a `/` or `://`, or naming something
    that exists here, is a destination; anything else is a job id at $RAY_API_SERVER_ADDRESS.

    Shows the job's state and the run's status document (DST/.rewriter/status.json): bytes and
    shards done, rate, ETA, the last error; a finished output reads as complete, a run whose
    driver is gone from this host as stopped, a Ctrl-C (or `ray job stop`) as interrupted. A job
    refused because another run holds the destination says so; a job that failed before its run
    started shows its last log lines. Exit status 1 when the job or the run failed or stopped (0
    when interrupted: the same command resumes it).
    """
    from rewriter.exec.dest import format_status
    from rewriter.tools.jobs import META_DST, JobService, failure_cause, refused_as_locked

    job: dict[str, Any] | None = None
    if address is not None:
        _refuse_non_job_id(target)
    if address is None and _is_destination(target):
        dst = target
    else:
        service = JobService(address, timeout)
        job = service.info(target)
        if job["status"] in ("FAILED", "STOPPED"):
            job["error"] = failure_cause(service.logs(target), job.get("message"))
        dst = job["metadata"].get(META_DST)
        if job["status"] == "FAILED" and refused_as_locked(job):
            job["refused"] = (f"this job never ran: another run holds the destination {dst} (exit status 75); "
                              f"the run below is that one, not this job's; submit again once it has ended")
        if not dst:
            raise click.BadParameter(f"job {target} was not submitted by `rewriter submit` (its metadata names no "
                                     f"destination); see it with `ray job status`", param_hint="JOB")
    doc, problem = _run_state(dst, dst_options, job)
    if job and doc and job["status"] in ("FAILED", "STOPPED") and doc["state"] in ("running", "stopped") \
            and not job.get("refused"):
        doc["note"] = ("the job ended while the run was writing; submit the same plan and destination again "
                       "to resume it")
    if as_json:
        click.echo(json.dumps({"job": job, "run": doc, "run_error": problem}, indent=1))
    else:
        for line in (_job_lines(job) if job else []) + (format_status(doc) if doc else [f"run:        {problem}"]):
            click.echo(line)
    sys.exit(EXIT_FOUND if _failed(job, doc) else EXIT_OK)


@click.command(cls=RewriterCommand)
@click.argument("job", metavar="JOB")
@address_option
@timeout_option
@click.option("--follow", is_flag=True, help="Keep printing new lines until the job ends.")
@_fail_cleanly
def logs(job: str, address: str | None, timeout: float, follow: bool) -> None:
    """Print the logs of Ray job JOB (what `rewriter run --ray` printed on the cluster)."""
    from rewriter.tools.jobs import JobService

    service = JobService(address, timeout)
    if follow:
        service.follow(job, lambda text: click.echo(text, nl=False))
    else:
        click.echo(service.logs(job), nl=False)


def register(group: click.Group) -> None:
    """Add ``submit`` (built from the group's ``run``), ``status`` and ``logs`` to ``group``."""
    group.add_command(_submit_command(group.commands["run"]))
    group.add_command(status)
    group.add_command(logs)
