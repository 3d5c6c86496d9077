"""The ``rewriter`` command group; the commands register themselves on it."""

from __future__ import annotations

import logging

import click

from rewriter.cli.errors import EXIT_STATUS_HELP, RewriterGroup


@click.group(cls=RewriterGroup, epilog=EXIT_STATUS_HELP)
@click.version_option(package_name="moe-rewriter")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Prune experts out of Mixture-of-Experts checkpoints by streaming byte ranges.

    Typical flow: `rewriter inspect SRC`, `rewriter plan SRC --saliency S.json --keep-frac 0.5
    --out plan.json` (prints the I/O cost), `rewriter run plan.json --out DST`, then
    `rewriter verify SRC DST`. `rewriter prune SRC DST ...` plans and runs in one go.
    """
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: an embedding program's logging setup wins
        handler = logging.StreamHandler()
        handler.setFormatter(_LogFormat())
        root.addHandler(handler)
        root.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)])


class _LogFormat(logging.Formatter):
    """Warnings as the CLI's own ``warning: ...`` lines; info and debug (-v, -vv) name their module."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {record.getMessage()}"
        return super().format(record)
