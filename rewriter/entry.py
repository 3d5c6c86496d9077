"""The ``rewriter`` console script. It imports nothing heavy before its ``try``, so a Ctrl-C or a
SIGTERM at any moment, even while the CLI's own modules load, ends with ``error: interrupted``
(exit status 130) or ``error: terminated (SIGTERM)`` (143), never a traceback. (A Ctrl-C while the
Python interpreter itself starts, before this module runs, is the interpreter's own to report.)"""

import signal
import sys

from core.errors import Terminated


def _terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def main() -> None:
    # Until the CLI installs its own handler (the same), a SIGTERM while modules load is caught here.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        from rewriter.cli import main as cli

        cli()
    except KeyboardInterrupt as e:
        # Only an interrupt outside a command gets here (while modules load, or while the CLI
        # starts or ends): the CLI reports its commands' interrupts itself.
        _interrupted(isinstance(e, Terminated))
    finally:
        # The command has ended and said all it will: a Ctrl-C during the interpreter's shutdown
        # would turn its status into 130 with no message, after output that says it finished.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupted(terminated: bool = False) -> None:
    message, status = ("terminated (SIGTERM)", 143) if terminated else ("interrupted", 130)
    if "--json" in sys.argv[1:]:
        sys.stdout.write(f'{{"error": "{message}", "exit_status": {status}}}\n')
    else:
        sys.stderr.write(f"error: {message}\n")
    sys.exit(status)


if __name__ == "__main__":
    main()
