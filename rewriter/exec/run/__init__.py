"""Running a plan on this machine: the local executor and the dry run."""
