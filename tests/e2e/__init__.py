"""End to end: what the README and --help promise, through the commands a user runs."""
