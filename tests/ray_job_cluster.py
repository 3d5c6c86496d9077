"""A real Ray cluster with the job service (head node with its dashboard), for the job tests.

Started with ``ray start --head`` on free ports and a temporary folder of its own; stopped by
killing only this cluster's processes (those naming its folder or its GCS port, and their
children): ``ray stop`` would end every Ray process on the machine, other tests' clusters too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

from tests.conftest import REPO

RAY = Path(sys.executable).with_name("ray")


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_env() -> dict[str, str]:
    """The environment of the cluster's processes: this checkout first on the path, this
    interpreter's ``python`` first on PATH (the job entry point is run as ``python -m``), and no
    token authentication (a token file in the home folder would otherwise switch it on)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _processes_of(temp_dir: str, gcs_port: int) -> set[psutil.Process]:
    marks = (temp_dir, f":{gcs_port}")
    found: set[psutil.Process] = set()
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and any(m in a for a in (p.info["cmdline"] or []) for m in marks):
            found.add(p)
            with suppress(psutil.Error):
                found.update(p.children(recursive=True))
    return found


def stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """Kill this cluster's processes only (``ray stop`` would kill every cluster here)."""
    for _ in range(3):
        procs = _processes_of(temp_dir, gcs_port)
        if not procs:
            return
        for p in procs:
            with suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(list(procs), timeout=10)


@contextmanager
def job_cluster(num_cpus: int = 2) -> Iterator[str]:
    """A head node with the job service; yields its dashboard address ``http://127.0.0.1:PORT``."""
    # Short: Ray's socket paths live under the temp dir and must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, metrics, env_agent = free_ports(7)
    cmd = [str(RAY), "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash),
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", str(num_cpus),
           "--temp-dir", temp_dir, "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(env_agent),
           "--disable-usage-stats"]
    try:
        subprocess.run(cmd, env=cluster_env(), check=True, capture_output=True, text=True, timeout=180)
        address = f"http://127.0.0.1:{dash}"
        _wait_for_job_service(address)
        yield address
    finally:
        stop_cluster(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_service(address: str, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)
