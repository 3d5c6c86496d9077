"""Storage access through fsspec: local paths, ``memory://``, ``s3://``, ``hf://``, ``gs://``.

All tensor reads go through :class:`Storage`, which counts requests and bytes so tests and
benchmarks can prove that only headers and kept byte ranges were fetched.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from core.errors import CheckpointError
from core.remote import GuardedFileSystem, open_fs


def _unwrapped(fs: Any) -> Any:
    return fs.wrapped if isinstance(fs, GuardedFileSystem) else fs


@dataclass
class IOCounter:
    """Range requests and bytes fetched; thread-safe."""

    requests: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += nbytes


def is_local_url(url: str) -> bool:
    """Whether ``url`` names the local filesystem (a path, or ``file://``/``local://``), without
    opening anything."""
    from fsspec.core import split_protocol

    protocol, _ = split_protocol(str(url))
    return protocol in (None, "file", "local")


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file or folder at local ``path``, following symlinks; None when
    there is nothing there. Two paths with the same identity are one file."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _identities_up_from(path: str) -> set[tuple[int, int]]:
    """Identities of ``path`` (if it exists) and of every folder above it."""
    found = set()
    while True:
        ident = file_identity(path)
        if ident is not None:
            found.add(ident)
        parent = os.path.dirname(path)
        if parent == path:
            return found
        path = parent


def _normal_prefix(root: str) -> str:
    """An object-store location as bucket and key prefix: ``b//x/./y/`` is ``b/x/y``."""
    return "/".join(p for p in root.split("/") if p not in ("", "."))


class Storage:
    """One fsspec location (a directory or prefix) with counted ranged reads.

    Args:
        url: a local path or any fsspec URL (``s3://bucket/ckpt``, ``hf://org/repo``…).
        storage_options: passed to the fsspec filesystem (credentials, endpoint_url…).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = str(url)
        fs, root = open_fs(self.url, storage_options)
        # A remote store that cannot be reached or refuses the credentials is named, with the
        # options to pass, by whichever call finds it out.
        self.fs = fs if isinstance(fs, LocalFileSystem) else GuardedFileSystem(fs, self.url)
        self.root = root.rstrip("/") if root != "/" else root
        #: A GGUF model is named by its file; the folder holding it (and its splits) is the root.
        self.entry: str | None = None
        if self.root.endswith(".gguf") and "/" in self.root:
            self.root, self.entry = posixpath.split(self.root)
        self.counter = IOCounter()
        self._fds: dict[str, int] = {}

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, name: str) -> str:
        """Path of ``name`` (relative, ``/``-separated) inside this location."""
        return f"{self.root}/{name}" if self.root else name

    def local_path(self, name: str) -> str:
        """OS path of ``name``; only for local storage."""
        assert self.is_local
        return os.path.join(self.root, *name.split("/"))

    @property
    def protocols(self) -> tuple[str, ...]:
        """The filesystem's protocol names (``("s3", "s3a")``, ``("file", "local")``…)."""
        p = self.fs.protocol
        return tuple(p) if isinstance(p, (tuple, list)) else (str(p),)

    def exists(self, name: str = "") -> bool:
        """Whether ``name`` (default: this location itself) exists."""
        return bool(self.fs.exists(self.path(name) if name else self.root))

    def exists_beside(self, name: str) -> bool:
        """Whether ``name`` exists in the folder that holds this location."""
        folder = posixpath.dirname(self.root.rstrip("/"))
        return bool(self.fs.exists(f"{folder}/{name}" if folder else name))

    def isdir(self, name: str = "") -> bool:
        return bool(self.fs.isdir(self.path(name) if name else self.root))

    def isfile(self, name: str = "") -> bool:
        return bool(self.fs.isfile(self.path(name) if name else self.root))

    def listdir(self, name: str) -> list[str]:
        """Base names of the entries of folder ``name``."""
        return [posixpath.basename(str(p).rstrip("/")) for p in self.fs.ls(self.path(name), detail=False)]

    def open(self, name: str, mode: str = "rb", **kwargs: Any) -> Any:
        """An fsspec file object of ``name``."""
        return self.fs.open(self.path(name), mode, **kwargs)

    def pipe(self, name: str, data: bytes) -> None:
        """Write ``data`` as the whole of ``name`` (one object on object stores)."""
        self.fs.pipe_file(self.path(name), data)

    def remove(self, name: str, recursive: bool = False) -> None:
        self.fs.rm(self.path(name), recursive=recursive)

    def invalidate_cache(self) -> None:
        """Forget cached listings: another process (or a completed upload) changed the store."""
        self.fs.invalidate_cache()

    def identities(self, names: Iterable[str]) -> dict[tuple[int, int], str]:
        """``(device, inode) -> name`` of those of ``names`` that are files on a local disk (an
        object store has no other names for its objects: empty)."""
        if not self.is_local:
            return {}
        found = {file_identity(self.local_path(n)): n for n in names}
        found.pop(None, None)
        return found  # type: ignore[return-value]

    def is_within(self, other: Storage) -> bool:
        """Whether this location is ``other`` or lies inside it (same kind of filesystem).

        Local folders are compared by identity (device and inode), so a second path to the same
        folder (a bind mount, a symlinked parent, ``..``) is still the same folder; object-store
        locations by bucket and key prefix with repeated ``/`` and ``.`` segments removed.
        """
        if self.is_local and other.is_local:
            a, b = os.path.realpath(self.root), os.path.realpath(other.root)
            if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
                return True
            folder = file_identity(b)
            return folder is not None and folder in _identities_up_from(a)
        if type(_unwrapped(self.fs)) is not type(_unwrapped(other.fs)):
            return False
        a, b = _normal_prefix(self.root), _normal_prefix(other.root)
        return a == b or a.startswith(b + "/") or not b

    @contextlib.contextmanager
    def _found(self, name: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise CheckpointError(f"{self.describe(name)}: file not found") from None

    def size(self, name: str) -> int:
        with self._found(name):
            return int(self.fs.size(self.path(name)))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``name``; one counted request."""
        if end <= start:
            return b""
        with self._found(name):
            data = self.fs.cat_file(self.path(name), start=start, end=end)
        self.counter.add(len(data))
        return bytes(data)

    def iter_range(self, name: str, start: int, end: int, buffer: bytearray) -> Iterator[memoryview | bytes]:
        """Bytes ``[start, end)`` of ``name`` in chunks of at most ``len(buffer)``.

        Local files are read into ``buffer`` itself (each chunk is valid until the next one);
        remote ones with one ranged request per chunk. Raises on a short file.
        """
        view = memoryview(buffer)
        pos = start
        if self.is_local:
            self.prefetch(name, pos, min(len(view), end - pos))
        while pos < end:
            want = min(len(view), end - pos)
            if self.is_local:
                self.prefetch(name, pos + want, min(len(view), end - pos - want))
                n = os.preadv(self.fd(name), [view[:want]], pos)
                self.counter.add(n)
                chunk: memoryview | bytes = view[:n]
            else:
                chunk = self.read_range(name, pos, pos + want)
                n = len(chunk)
            if n == 0:
                raise CheckpointError(
                    f"{self.describe(name)}: ends at byte {pos:,}, before the expected {end:,}; "
                    f"the file is truncated or changed"
                )
            yield chunk
            pos += n

    def fd(self, name: str) -> int:
        """A cached read-only descriptor of local file ``name`` (closed by :meth:`close`)."""
        fd = self._fds.get(name)
        if fd is None:
            with self._found(name):
                fd = self._fds[name] = os.open(self.local_path(name), os.O_RDONLY)
            # No speculative readahead: it would read dropped experts next to kept ones. The
            # copier asks for exactly the ranges it needs ahead of time (prefetch).
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def prefetch(self, name: str, start: int, length: int) -> None:
        """Start reading ``[start, start + length)`` of a local file into the page cache."""
        if self.is_local and length > 0 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd(name), start, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def read_all(self, name: str) -> bytes:
        """A small file whole (config, index, tokenizer files); counted."""
        with self._found(name):
            data = self.fs.cat_file(self.path(name))
        self.counter.add(len(data))
        return bytes(data)

    def list_files(self) -> list[str]:
        """Every file below this location, as relative ``/``-separated names, sorted. Local
        symlinks to folders are followed (once each), so a folder is never taken for a file."""
        out = []
        prefix = self.root.rstrip("/") + "/"
        for p in self.fs.find(self.root):
            p = str(p)
            out.append(p[len(prefix):] if p.startswith(prefix) else p)
        if self.is_local:
            out = [f for name in out for f in self._files_through_link(name)]
        return sorted(out)

    def _files_through_link(self, name: str) -> list[str]:
        """``[name]`` for a file; the files below a folder ``name`` that is a symlink."""
        path = self.local_path(name)
        if not os.path.isdir(path):
            return [name]
        found: list[str] = []
        seen = {file_identity(self.root)}
        for folder, subs, files in os.walk(path, followlinks=True):
            ident = file_identity(folder)
            if ident in seen:  # a link back up the tree: listed already
                subs[:] = []
                continue
            seen.add(ident)
            rel = os.path.relpath(folder, self.root).replace(os.sep, "/")
            found.extend(f"{rel}/{f}" for f in files)
        return found

    def describe(self, name: str) -> str:
        """A user-facing name of ``name`` in this location."""
        if self.is_local:
            return self.local_path(name)
        folder = self.url.rstrip("/")
        if self.entry is not None:
            folder = folder[: -len(self.entry) - 1]
        return f"{folder}/{name}"


