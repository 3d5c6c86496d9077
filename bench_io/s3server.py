"""A real S3 API on loopback (moto's standalone server) for tests and the S3 benchmark.

Needs the ``s3`` extra (``pip install '.[s3]'``: s3fs and moto's server).

moto answers a ranged GET by reading the whole object and slicing it, which costs seconds per
request on objects of gigabytes and holds the object's lock meanwhile. ``start_s3(...,
ranged_reads=True)`` (the benchmark's store) runs moto with ranged GETs reading only their
range from the object's buffer; every other request is moto's own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen

    @property
    def options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options for this server."""
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint,
                                                                        "region_name": "us-east-1"}}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=name)

    def upload_dir(self, local: Path, url: str) -> None:
        fs = self.fs()
        for p in sorted(local.rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{url.rstrip('/')}/{p.relative_to(local).as_posix()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_s3(log: Path, ranged_reads: bool = False) -> S3Server:
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    module = "bench_io.s3server" if ranged_reads else "moto.server"
    proc = subprocess.Popen([sys.executable, "-m", module, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return S3Server(endpoint, proc)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not answer within 30 s")


class _RangedValue:
    """An object's bytes as moto's range handling sees them: its length, and slices read from
    the object's buffer on demand."""

    def __init__(self, key: Any):
        self.key = key

    def __len__(self) -> int:
        return int(self.key.size)

    def __bool__(self) -> bool:
        return True

    def __getitem__(self, s: slice) -> bytes:
        start, stop, _ = s.indices(len(self))
        with self.key.lock:
            self.key._value_buffer.seek(start)
            return bytes(self.key._value_buffer.read(stop - start))


def _serve_ranges_from_buffers() -> None:
    """Patch moto so that a GET with a Range header reads only that range."""
    import threading

    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    ranged = threading.local()
    value = FakeKey.value

    def get(self: Any) -> Any:
        if getattr(ranged, "on", False):
            return _RangedValue(self)
        return value.fget(self)  # type: ignore[attr-defined]

    FakeKey.value = property(get, value.fset)  # type: ignore[method-assign,assignment]
    get_object = S3Response.get_object

    def get_object_ranged(self: Any) -> Any:
        ranged.on = bool(self.headers.get("range"))
        try:
            return get_object(self)
        finally:
            ranged.on = False

    S3Response.get_object = get_object_ranged  # type: ignore[method-assign]


if __name__ == "__main__":
    from moto.server import main

    _serve_ranges_from_buffers()
    main(sys.argv[1:])
