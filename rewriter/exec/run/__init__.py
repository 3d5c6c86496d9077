"""Running a plan on this machine: the local executor (also what a Ray actor runs per shard) and
the per-layer dry run."""

from rewriter.exec.options import RunOptions
from rewriter.exec.run.dryrun import dry_run
from rewriter.exec.run.executor import RunResult, execute, peak_rss_bytes, write_output_shard

__all__ = ["RunOptions", "RunResult", "dry_run", "execute", "peak_rss_bytes", "write_output_shard"]
