"""Several devices of one host: the batches split across them, one process per device.

Each process opens the checkpoint and runs the layer-streamed engine on its share of the batches
(consecutive batches, shares balanced by tokens), then hands back what can be merged exactly:
``profile``'s float64 sums (frequencies and REAP sums add, maximum norms take the maximum) and
its spill folder; ``eval``'s per-token scores, put back in batch order. EAFT-REAP's thresholds
are exact percentiles over the per-token ``p`` and ``H`` of every spill together, the very values
one device computes them from (docs/streaming.md).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import DeviceError, RewriterError, is_out_of_memory, out_of_memory


def parse_devices(spec: str) -> list[str]:
    """``cuda:0,cuda:1``, ``all`` (every visible CUDA device) or ``cpu,cpu`` (processes on the
    CPU) as a list of torch device names; a clear :class:`DeviceError` for anything else."""
    import torch

    where = f"--devices {spec}"
    if spec.strip() == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"{where}: this torch ({torch.__version__}) sees no CUDA device; name the "
                              f"devices (e.g. cpu,cpu) or run on a machine with GPUs")
        return [f"cuda:{i}" for i in range(n)]
    names = [d.strip() for d in spec.split(",")]
    if not names or any(not d for d in names):
        raise DeviceError(f"{where}: expected a comma-separated list of devices (cuda:0,cuda:1) or all")
    out = [_device(d, where) for d in names]
    twice = sorted({d for d in out if d != "cpu" and out.count(d) > 1})
    if twice:
        raise DeviceError(f"{where}: {', '.join(twice)} listed twice; name each GPU once")
    return out


def device_list(devices: Sequence[str] | None, device: str, streamed: bool | None) -> list[str]:
    """``devices``, else ``[device]``; several devices always run streamed, so ``streamed=False``
    with them is refused."""
    out = list(devices or [device])
    if len(out) > 1 and streamed is False:
        raise RewriterError(f"--devices {','.join(out)} runs the streamed engine on each device; drop "
                            f"--no-streamed, or give one device")
    return out


def streamed_with(devices: Sequence[str] | None, streamed: bool | None) -> bool | None:
    """Whether to stream: a device list, of one device too, runs the streamed engine on each
    device unless ``streamed`` says otherwise (``False`` with several is refused by
    :func:`device_list`)."""
    return True if devices is not None and streamed is None else streamed


def _device(name: str, where: str) -> str:
    import torch

    if name == "cpu":
        return name
    kind, _, index = name.partition(":")
    if kind != "cuda" or not index.isdigit():
        raise DeviceError(f"{where}: {name!r} is not a device; expected cpu or cuda:N (N a number)")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index) >= n:
        raise DeviceError(f"{where}: {name} does not exist: this torch sees {n} CUDA device(s)"
                          f"{f' (cuda:0 to cuda:{n - 1})' if n else ''}")
    return f"cuda:{int(index)}"


def shares(sizes: Sequence[int], n: int) -> list[range]:
    """``n`` runs of consecutive batch indices with about equal tokens (``sizes``); one batch at
    least in each while there are enough (some empty when there are not)."""
    total, bounds, held, start = sum(sizes), [0], 0, 0
    for w in range(n - 1):
        end = start
        while end < len(sizes) - (n - 1 - w) and (end == start or held + sizes[end] <= total * (w + 1) / n):
            held += sizes[end]
            end += 1
        bounds.append(end)
        start = end
    bounds.append(len(sizes))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class Job:
    """What one device's process needs to open the model and run: all plain, picklable values."""

    model: str
    storage_options: dict[str, Any]
    device: str
    dtype: str
    gpu_memory: int | None
    expert_chunk: int | None


def engine(job: Job):
    """The streamed engine of ``job`` in this process."""
    import torch

    from core.checkpoint import Checkpoint
    from profiling.streamed import StreamedModel

    if job.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(job.device))
    ckpt = Checkpoint.open(job.model, job.storage_options)
    return ckpt, StreamedModel(ckpt, device=job.device, dtype=getattr(torch, job.dtype),
                               gpu_memory=job.gpu_memory, expert_chunk=job.expert_chunk)


def _call(fn: Callable[..., Any], job: Job, *args: Any) -> Any:
    try:
        return fn(job, *args)
    except Exception as e:
        if is_out_of_memory(e):  # outside the engine, which names the layer itself
            e = out_of_memory(e, f"in the process running on {job.device}",
                              "lower --gpu-memory, --batch-size or --expert-chunk, or give fewer devices")
        if not isinstance(e, RewriterError):
            raise
        # Re-raised plain: some error types cannot be rebuilt from a pickle.
        said = str(e)
        err = RewriterError(said if job.device in said else f"{job.device}: {said}")
        err.exit_code = e.exit_code
        raise err from None


def run_all(fn: Callable[..., Any], jobs: Sequence[Job], args: Sequence[tuple]) -> list[Any]:
    """``fn(job, *arg)`` for every job, each in its own (spawned) process; results in job order."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=ctx) as pool:
        futures = [pool.submit(_call, fn, job, *a) for job, a in zip(jobs, args)]
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool:
            raise RewriterError(f"a process running on {', '.join(j.device for j in jobs)} ended without a "
                                f"result (killed: out of host memory?); try fewer devices or a smaller "
                                f"--batch-size") from None


def split(batches: Sequence[np.ndarray], n: int) -> list[list[np.ndarray]]:
    """The batches in ``n`` consecutive shares (see :func:`shares`)."""
    return [[batches[i] for i in r] for r in shares([b.size for b in batches], n)]


def merged_engine(devices: Sequence[str], stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The first device's measurements, with the slowest total, the largest peak and every
    device's own under ``workers``."""
    peaks = [s["peak_device_bytes"] for s in stats if s.get("peak_device_bytes") is not None]
    return {**stats[0], "total_s": max(s["total_s"] for s in stats), "peak_device_bytes": max(peaks, default=None),
            "devices": list(devices), "workers": list(stats)}
