"""Entry point of a Ray Job: ``rewriter run --ray`` on the cluster the job runs in.

``rewriter submit PLAN --out DST --address http://HEAD:8265 [run options]`` submits a job that
runs this module with the plan sent along (see :mod:`rewriter.tools.jobs`); by hand it is::

    ray job submit --address http://HEAD:8265 -- \\
        python -m ray_jobs.rewrite s3://bucket/plans/120b-keep64.json --out s3://bucket/pruned/120b-keep64 --workers 16

It is the same command as ``rewriter run PLAN --out DST --ray``, with the same options and
defaults (``python -m ray_jobs.rewrite --help`` lists them); inside a job Ray connects to the
job's cluster. The package is installed on every node; the destination (and the plan, when
not sent with the job) live on storage every node reaches (a shared filesystem or an object
store). The run keeps its status document in ``DST/.rewriter/status.json`` (``rewriter status``).
``ray job stop`` (SIGTERM to this process) is an interrupt, as Ctrl-C is to ``rewriter run``: the
tasks in flight are given up, the status document reads ``interrupted``, and the same job resumes.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from rewriter.cli import main as rewriter


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run ``rewriter run --ray`` with ``argv`` (default: this process's arguments); exits."""
    args = sys.argv[1:] if argv is None else argv
    # `ray job stop` sends SIGTERM and, a few seconds later, SIGKILL: in between the run records
    # that it was interrupted, as a Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The run command itself (not the group), so its usage line reads as this entry point is typed.
    rewriter.commands["run"].main(["--ray", *args], prog_name="python -m ray_jobs.rewrite")


if __name__ == "__main__":
    main()
