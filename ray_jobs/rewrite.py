"""Entry point for ``ray job submit``: ``rewriter run --ray`` on the cluster the job runs in.

Example::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m ray_jobs.rewrite s3://bucket/plans/120b-keep64.json --out s3://bucket/pruned/120b-keep64 --workers 16

It is the same command as ``rewriter run PLAN --out DST --ray``, with the same options and
defaults (``python -m ray_jobs.rewrite --help`` lists them); inside a job Ray connects to the
job's cluster. Plan and destination live on storage every node reaches (a shared filesystem or
an object store).
"""

from __future__ import annotations

import logging
import sys

from rewriter.cli import main as rewriter


def main(argv: list[str] | None = None) -> None:
    """Run ``rewriter run --ray`` with ``argv`` (default: this process's arguments); exits."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The run command itself (not the group), so its usage line reads as this entry point is typed.
    rewriter.commands["run"].main(["--ray", *args], prog_name="python -m ray_jobs.rewrite")


if __name__ == "__main__":
    main()
