"""``python -m rewriter.cli``."""

from rewriter.cli import main

main()
