"""The ``rewriter`` command line. Heavy modules (torch, ray) are imported inside commands.

One module per command group, each parsing its options, calling the library and printing; each
registers its commands on :data:`main` (:mod:`.group`):

* :mod:`.synthetic`: ``synth``, ``synth-saliency``
* :mod:`.planning`: ``plan``, ``stability``
* :mod:`.running`: ``run``, ``prune``, ``soft-prune``, ``dry-run`` (a run's options: :mod:`.runopts`)
* :mod:`.checking`: ``inspect``, ``verify``, ``check``, ``card``, ``cleanup``
* :mod:`.gpu`: ``profile``, ``eval``, ``import-reap``
* :mod:`.recalibration`: ``recalibrate``
* :mod:`.jobs`: ``submit``, ``status``, ``logs`` (Ray Jobs)
"""

from rewriter.cli import checking, gpu, planning, recalibration, running, synthetic  # noqa: F401 (they register their commands)
from rewriter.cli.group import main
from rewriter.cli.jobs import register

register(main)

__all__ = ["main"]
