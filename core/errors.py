"""The project's errors.

Every error names the file or tensor concerned, says what was expected and what was found, and,
where there is one, what to do. The CLI prints ``str(error)`` and exits with ``exit_code``.
"""

from __future__ import annotations


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (``"1 shard"``, ``"3 shards"``), for messages."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class RewriterError(Exception):
    """Base class of every error this project raises on purpose."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``kill``, ``timeout``, Kubernetes, Slurm): the command stops as it does on
    Ctrl-C (temporaries removed, finished work kept, a resumable run), with its own exit status."""


class FormatError(RewriterError):
    """A safetensors file breaks a rule of the format (header, dtypes, offsets, size)."""


class CheckpointError(RewriterError):
    """A checkpoint is inconsistent: index, shards, config, or files that are missing."""


class SaliencyError(RewriterError):
    """A saliency file or keep list is malformed or does not fit the checkpoint."""


class StorageAccessError(RewriterError):
    """An object store cannot be reached, or refuses the credentials (or their absence).

    ``option`` is the command-line option that carries the store's options; the CLI sets it
    (:meth:`for_option`), since the same store is ``--storage-options`` to one command and
    ``--src-options`` or ``--dst-options`` to another.
    """

    def __init__(self, url: str, problem: str, remedy: str, option: str | None = None):
        self.url, self.problem, self.remedy, self.option = url, problem, remedy, option
        how = option or "the storage options of this URL (--storage-options, --src-options or --dst-options)"
        super().__init__(f"{url}: {problem}; pass {how} {remedy}")

    def for_option(self, option: str) -> StorageAccessError:
        return StorageAccessError(self.url, self.problem, self.remedy, option)


class DeviceError(RewriterError):
    """The compute device asked for cannot be used (no CUDA, unknown device)."""


class PolicyError(RewriterError):
    """A keep policy cannot be satisfied (impossible keep count, top-k, multiples)."""


class OptionError(RewriterError):
    """Planning options that conflict or do not fit the checkpoint. ``option`` names the
    :class:`planners.prune.PlanOptions` field concerned (None when options conflict)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class PlanError(RewriterError):
    """A plan is malformed, of an unknown version, or does not match its source."""


class ExecutionError(RewriterError):
    """A rewrite could not be carried out (destination, disk space, short source)."""


class DestinationFullError(ExecutionError):
    """The destination ran out of space (or quota). ``kept`` says what a resume starts from."""

    def __init__(self, where: str, reason: str, kept: str = "this file was not published"):
        super().__init__(f"{where}: no space left on the destination ({reason}); {kept}: free space and run "
                         f"the same command again to resume")
        self.where, self.reason, self.kept = where, reason, kept

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # crosses process boundaries (Ray)
        return type(self), (self.where, self.reason, self.kept)


class CardError(RewriterError):
    """A model card cannot be written: no complete output, or an unreadable eval result."""


class DestinationLockedError(ExecutionError):
    """Another run holds the destination's lock (``DST/.rewriter/lock``).

    Exit status 75 (``EX_TEMPFAIL``): nothing is wrong with the input; try again once the other
    run has finished.
    """

    exit_code = 75


class DeviceMemoryError(RewriterError):
    """The compute device ran out of memory; the message says during what and what to lower."""


#: What torch's errors say when an allocation fails: its OutOfMemoryError (CUDA's caching
#: allocator, the CPU allocator) and the RuntimeErrors of CUDA calls that could not allocate.
_OUT_OF_MEMORY = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "can't allocate memory", "not enough memory")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch failing to allocate memory (checked by name, so this module needs
    no torch)."""
    if type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _OUT_OF_MEMORY)


def out_of_memory(e: BaseException, doing: str, remedy: str) -> DeviceMemoryError:
    """The clear error for ``e`` (see :func:`is_out_of_memory`) raised while ``doing``: what
    torch said first, then ``remedy``."""
    said = (str(e).strip().splitlines() or [type(e).__name__])[0]
    said = said.split("  See documentation for Memory Management")[0].strip().rstrip(".")  # CUDA's link
    return DeviceMemoryError(f"out of memory {doing} ({said}); {remedy}")
