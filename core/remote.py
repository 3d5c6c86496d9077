"""Object stores that cannot be reached or that refuse the credentials: one error naming the URL
and the options to pass, whichever call to the store found it out.

The filesystem of a remote :class:`core.storage.Storage` is wrapped in
:class:`GuardedFileSystem`, so every command (plan, run, check, inspect, verify, card…) and every
operation (listing, reading, writing, locking) reports these the same way. :func:`open_fs` opens
a URL's filesystem with the same errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import fsspec

from core.errors import RewriterError, StorageAccessError

# Matched by name, so that botocore and aiohttp stay optional (the s3 extra) and are not imported
# for local work.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError", "ClientOSError"}

# What huggingface_hub (httpx or requests underneath) raises when the Hub cannot be reached, or
# when HF_HUB_OFFLINE forbids trying.
_HUB_UNREACHABLE = {"ConnectError", "ConnectTimeout", "ConnectionError", "Timeout", "TimeoutException",
                    "OfflineModeIsEnabled", "LocalEntryNotFoundError", "NetworkError"}


def hub_problem(e: BaseException, url: str) -> str | None:
    """The message for an ``hf://`` ``url`` whose Hub cannot be reached (``e``), else None."""
    if not url.startswith("hf://") or not {cls.__name__ for cls in type(e).__mro__} & _HUB_UNREACHABLE:
        return None
    if "Offline" in type(e).__name__:
        return _hub_message(url, "HF_HUB_OFFLINE is set, so hf:// URLs are not fetched")
    return _hub_message(url, f"cannot reach the Hugging Face Hub ({type(e).__name__}: {e})")


def refuse_offline_hub(url: str) -> None:
    """RewriterError for an ``hf://`` ``url`` under ``HF_HUB_OFFLINE``: the Hub's filesystem would
    otherwise answer as if the repository were empty."""
    from huggingface_hub import constants

    if url.startswith("hf://") and constants.HF_HUB_OFFLINE:
        raise RewriterError(_hub_message(url, "HF_HUB_OFFLINE is set, so hf:// URLs are not fetched"))


def _hub_message(url: str, problem: str) -> str:
    repo = url[len("hf://"):].removeprefix("models/").split("@")[0].rstrip("/") or "ORG/NAME"
    return (f"{url}: {problem}; to work offline give a local snapshot folder instead: one downloaded "
            f"with `hf download {repo} --local-dir DIR`, or its folder in the Hugging Face cache "
            f"(~/.cache/huggingface/hub/models--{repo.replace('/', '--')}/snapshots/REVISION)")


def store_problem(e: BaseException) -> tuple[str, str] | None:
    """(what went wrong, what to pass) when ``e`` says the store cannot be used, else None."""
    names = {cls.__name__ for cls in type(e).__mro__}
    if names & _NO_CREDENTIALS:
        return ("no credentials for this object store",
                '\'{"key": "...", "secret": "..."}\' (or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)')
    if names & _UNREACHABLE:
        return (f"cannot connect to the object store ({e})",
                "'{\"client_kwargs\": {\"endpoint_url\": \"http://HOST:PORT\"}}' with an endpoint that is up")
    if isinstance(e, PermissionError):
        return (f"the object store refused access ({e})", "credentials that may read (and write) it")
    return None


class GuardedFileSystem:
    """An fsspec filesystem whose calls raise :class:`StorageAccessError` for ``url`` when the
    store cannot be reached or refuses the credentials; everything else passes through."""

    def __init__(self, fs: Any, url: str):
        self._fs, self._url = fs, url

    @property
    def wrapped(self) -> Any:
        return self._fs

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(storage.fs, S3FileSystem) holds, as for the store itself
        return type(self._fs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fs", "_url"):
            raise AttributeError(name)  # never recurse (copy, pickle) before __init__ has run
        attr = getattr(self._fs, name)
        return self._guard(attr) if callable(attr) else attr

    def _guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                hub = hub_problem(e, self._url)
                if hub is not None:
                    raise RewriterError(hub) from None
                problem = store_problem(e)
                if problem is None:
                    raise
                raise StorageAccessError(self._url, *problem) from None

        return call

    def __reduce__(self) -> tuple[Any, ...]:
        return GuardedFileSystem, (self._fs, self._url)


#: Connections an S3 client may open (botocore's default is 10): the copy keeps up to
#: ``--max-inflight-requests`` ranged GETs in flight. A ``config_kwargs`` option given wins.
S3_POOL_CONNECTIONS = 64


def _with_connection_pool(url: str, options: dict[str, Any]) -> dict[str, Any]:
    if url.split("://", 1)[0] in ("s3", "s3a") and "max_pool_connections" not in options.get("config_kwargs", {}):
        options["config_kwargs"] = {**options.get("config_kwargs", {}), "max_pool_connections": S3_POOL_CONNECTIONS}
    return options


def open_fs(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """fsspec's filesystem for ``url``; a protocol without its package, an unknown protocol or a
    store that cannot be reached while connecting is one error naming the URL."""
    if url.startswith("hf://"):
        refuse_offline_hub(url)
    try:
        return fsspec.core.url_to_fs(url, **_with_connection_pool(url, dict(storage_options or {})))
    except ImportError as e:
        raise RewriterError(f"{url}: this kind of storage needs a package that is not installed ({e})") from None
    except ValueError as e:
        raise RewriterError(f"{url}: not a storage URL this tool can open ({e}); give a local path or "
                            f"an fsspec URL such as s3://bucket/path or hf://org/name") from None
    except OSError as e:
        raise StorageAccessError(url, f"cannot connect to the store ({e.strerror or e})",
                                 "options that reach it") from None
