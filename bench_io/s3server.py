"""A real S3 API on loopback (moto's standalone server) for tests and the S3 benchmark.

Needs the ``s3`` extra (``pip install '.[s3]'``: s3fs and moto's server).
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


def start_s3(log: Path) -> S3Server:
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
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
