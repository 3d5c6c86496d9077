"""The ``rewriter`` console script. It imports nothing heavy before its ``try``, so a Ctrl-C at
any moment, even while the CLI's own modules load, ends with ``error: interrupted`` and exit
status 130, never a traceback. (A Ctrl-C while the Python interpreter itself starts, before
this module runs, is the interpreter's own to report.)"""

import signal
import sys


def main() -> None:
    try:
        from rewriter.cli import main as cli

        cli()
    except KeyboardInterrupt:
        # Only an interrupt outside a command gets here (while modules load, or while the CLI
        # starts or ends): the CLI reports its commands' interrupts itself.
        _interrupted()
    finally:
        # The command has ended and said all it will: a Ctrl-C during the interpreter's shutdown
        # would turn its status into 130 with no message, after output that says it finished.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupted() -> None:
    if "--json" in sys.argv[1:]:
        sys.stdout.write('{"error": "interrupted", "exit_status": 130}\n')
    else:
        sys.stderr.write("error: interrupted\n")
    sys.exit(130)


if __name__ == "__main__":
    main()
