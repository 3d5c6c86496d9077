"""Running a plan, in five floors, each importing only those below it:

* :mod:`rewriter.exec.io` moves bytes: planned ranges copied into outputs, the files they write;
* :mod:`rewriter.exec.dest` holds destinations and the state a run keeps in them (lock, journal,
  status document, cleanup);
* :mod:`rewriter.exec.publish` checks and publishes an output (verify, ``pruning.json``, the model
  card);
* :mod:`rewriter.exec.run` runs a plan on this machine (the executor, the dry run);
* :mod:`rewriter.exec.distributed` runs and verifies a plan on Ray.

This file imports nothing, so that reaching one floor does not load the others.
"""
