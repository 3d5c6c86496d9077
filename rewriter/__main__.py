"""``python -m rewriter``: the same as the ``rewriter`` command."""

from rewriter.entry import main

main()
