"""How every ``rewriter`` command ends when it fails: one ``error:`` line (JSON under ``--json``)
and a documented exit status, never a traceback."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from core.errors import (
    RewriterError,
    StorageAccessError,
    Terminated,
    is_out_of_memory,
    out_of_memory,
)

log = logging.getLogger(__name__)

#: Exit statuses of every command (also in README "Exit statuses" and each command's --help).
EXIT_OK, EXIT_FOUND, EXIT_ERROR, EXIT_BUG, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 75, 130
#: 128 + SIGTERM, the status a shell reports for a process SIGTERM ended.
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_STATUS_HELP = (
    "Exit status: 0 done; 1 the checks ran and found a problem (verify: mismatches or problems; eval "
    "--compare: a gate failed; check: a rule failed; status: the job or the run failed); 2 error: bad usage or input, or the work could not be done (one "
    "'error:' line says which and what to do); 3 internal error (a bug: please report it with the "
    "output of `rewriter -vv COMMAND ...`); 75 the destination is in use by another run (wait for it to end); 130 "
    "interrupted (Ctrl-C); 143 terminated (SIGTERM, as sent by kill, timeout, Kubernetes, Slurm), "
    "handled as Ctrl-C is. With --json an error is printed to stdout as "
    '{"error": MESSAGE, "exit_status": N}.'
)
_DEVICE_MEMORY_REMEDY = ("run it with --streamed (one decoder layer at a time on the device), lower "
                         "--batch-size or --seq-len, or free the device (nvidia-smi lists the processes "
                         "holding it)")
# What an interrupted command leaves and how to go on; commands that write set it.
_interrupt_hint: list[str | Callable[[], str]] = []


def on_interrupt(hint: str | Callable[[], str]) -> None:
    """Say ``hint`` after "interrupted"; a callable is asked when the interrupt comes, for a hint
    that depends on what was written by then."""
    _interrupt_hint[:] = [hint]


def _hint() -> str:
    hint = _interrupt_hint[0] if _interrupt_hint else ""
    return hint() if callable(hint) else hint


def _describe_error(e: BaseException) -> tuple[str, int]:
    """The one-line message and exit status for an exception that ends a command."""
    if isinstance(e, RewriterError):
        return str(e), e.exit_code
    if isinstance(e, click.UsageError):
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        return e.format_message() + where, EXIT_ERROR
    if isinstance(e, click.ClickException):
        return e.format_message(), EXIT_ERROR
    if isinstance(e, Terminated):
        return "terminated (SIGTERM)" + (f"; {_interrupt_hint[0]}" if _interrupt_hint else ""), EXIT_TERMINATED
    if isinstance(e, (KeyboardInterrupt, click.Abort)):
        hint = _hint()
        return "interrupted" + (f"; {hint}" if hint else ""), EXIT_INTERRUPTED
    if isinstance(e, ModuleNotFoundError):
        return (f"this command needs the Python package {e.name!r}, which is not installed; install the "
                f"extra that brings it: pip install 'moe-rewriter[torch]' (or [ray], [s3])"), EXIT_ERROR
    if isinstance(e, MemoryError):
        return ("out of memory; free memory or lower the memory this command asks for (--buffer-mib, "
                "--workers, --batch-size), then run the same command again"), EXIT_ERROR
    if is_out_of_memory(e):  # the streamed engine names the layer itself; this is the whole-model path
        return str(out_of_memory(e, "running the model", _DEVICE_MEMORY_REMEDY)), EXIT_ERROR
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        what = e.strerror or str(e) or type(e).__name__
        return f"{where}{what}; check the path, its permissions and free space, then run again", EXIT_ERROR
    log.debug("internal error", exc_info=e)
    ctx = click.get_current_context(silent=True)
    command = ctx.info_name if ctx and ctx.parent else "COMMAND"
    return (f"internal error ({type(e).__name__}: {e}); this is a bug: please report it with the output of "
            f"the same command run with -vv right after `rewriter`: `rewriter -vv {command} ...`"), EXIT_BUG


def _exit_with(e: BaseException, as_json: bool) -> None:
    message, status = _describe_error(e)
    if as_json:
        click.echo(json.dumps({"error": message, "exit_status": status}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(status)


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """End a command that fails with one ``error:`` line (JSON under --json) and its exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except StorageAccessError as e:
            _exit_with(e.for_option(_storage_option(e.url, kwargs)), bool(kwargs.get("as_json")))
        except (Exception, KeyboardInterrupt) as e:  # every failure ends in one line, never a traceback
            _exit_with(e, bool(kwargs.get("as_json")))

    return wrapper


def _storage_option(url: str, params: dict[str, Any]) -> str:
    """The option of the command that carries fsspec options for ``url``: the destination's, the
    source's (``run``, ``verify``, ``card``) or the one location's (``--storage-options``)."""
    if "dst_options" in params and "src_options" not in params and "storage_options" not in params:
        return "--dst-options"  # the command's one location option (status)
    if "dst_options" in params:
        paths = params.get("paths") or (None,)
        dst = str(params.get("dst") or paths[-1] or "").rstrip("/")
        if dst and (url.rstrip("/") == dst or url.startswith(dst + "/")):
            return "--dst-options"
    return "--src-options" if "src_options" in params else "--storage-options"


def _terminated(signum: int, frame: Any) -> None:
    # Later SIGTERMs are ignored so that they cannot cut short the clean-up this one starts
    # (removing temporaries, recording the run as interrupted); SIGKILL still ends it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def stop_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated` in the main thread, so a command stops as on Ctrl-C;
    returns the handler it replaced (None when not on the main thread, where it cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminated)


class RewriterCommand(click.Command):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_STATUS_HELP)
        super().__init__(*args, **kwargs)


class RewriterGroup(click.Group):
    """Handles what fails before a command runs (bad options) like what fails inside one."""

    command_class = RewriterCommand

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        _interrupt_hint.clear()
        sys.stdout, sys.stderr = QuietWhenClosed.wrap(sys.stdout), QuietWhenClosed.wrap(sys.stderr)
        previous = stop_on_sigterm()
        try:
            status = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.format_message())  # plain `rewriter` asks for help: not an error
            sys.exit(EXIT_OK)
        except (Exception, KeyboardInterrupt) as e:
            _exit_with(e, "--json" in argv)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        sys.exit(status if isinstance(status, int) else EXIT_OK)


class QuietWhenClosed:
    """stdout or stderr that, once its reader has gone (`rewriter check X | head -1`), sends the
    rest of the output to /dev/null instead of failing.

    So a reader that stops early never changes what a command does or its exit status: the work
    finishes and the status is the work's own, whenever the reader stopped. (Dying of SIGPIPE,
    as many Unix tools do, would make the status depend on whether the reader left before the
    last write: 0 one time, 141 the next.)
    """

    def __init__(self, stream: Any):
        self._stream = stream

    @classmethod
    def wrap(cls, stream: Any) -> Any:
        return stream if isinstance(stream, cls) or stream is None else cls(stream)

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            self._drop_the_rest()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop_the_rest()

    def _drop_the_rest(self) -> None:
        """Point the file descriptor at /dev/null: what is still buffered, and all later output,
        including the interpreter's last flush, goes there without error."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
