"""The ways to carry out a plan that the benchmark compares; each runs as its own process.

``python -m bench_io.contenders NAME PLAN DST [--workers N]``

* ``naive``: ``safetensors.torch.load_file`` of each source shard, index the kept experts,
  ``save_file`` each output shard (what a first script does).
* ``lazy``: ``safe_open`` + ``get_slice`` per tensor (contiguous runs of kept experts), output
  shards assembled in memory, then ``save_file`` (the mergekit / huggingface_hub pattern).
* ``ours``: the local executor (positioned ``copy_file_range``, several pieces and shards at
  once); ``ours-buffered``: the same through a ring of buffers; ``ours-seq`` and
  ``ours-buffered-seq``: the sequential paths of earlier versions (``--max-inflight-mib 0``);
  ``ours-jobs1``, ``ours-jobs4``, ``ours-jobs8``: ``ours`` with that many output shards at once;
  ``ours-seg1``, ``ours-seg16``: ``ours`` with that many positioned copies in flight per shard;
  ``ours-ray``: the Ray executor.
* ``floor``: one ``copy_file_range`` of as many contiguous bytes as the output holds.

Remote sources (``--src-options``; :mod:`bench_io.remote`): ``ours``, ``ours-seq`` and
``ours-1stream`` (one request in flight) read the plan's source URL; ``download`` fetches the
source's shards whole with ``--requests`` ranged requests in flight, then prunes locally.

The benchmark also times a plain ``dd`` (``conv=fsync``) of the output's size from the same shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from planners.plan import Plan


def _source_rows(plan: Plan, t) -> list[int] | None:
    """Kept rows of a tensor sliced along the expert dim (None: copied whole)."""
    from core.layouts import GPT_OSS

    role = GPT_OSS.classify(t.source)
    if role is None or role.role == "expert":
        return None
    return list(plan.keep[role.layer])


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def naive(plan: Plan, dst: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    src = Path(plan.source_url)
    wanted: dict[str, list] = {}
    for o in plan.outputs:
        for t in o.tensors:
            wanted.setdefault(t.segments[0].shard, []).append((o.name, t))
    outputs: dict[str, dict[str, torch.Tensor]] = {o.name: {} for o in plan.outputs}
    for shard, items in sorted(wanted.items()):
        tensors = load_file(str(src / shard))
        for out_name, t in items:
            x = tensors[t.source]
            rows = _source_rows(plan, t)
            outputs[out_name][t.name] = x[rows].contiguous() if rows is not None else x
        del tensors
    for name, tensors in outputs.items():
        save_file(tensors, str(dst / name), metadata={"format": "pt"})


def lazy(plan: Plan, dst: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(plan.source_url)
    handles: dict[str, object] = {}
    for o in plan.outputs:
        tensors = {}
        for t in o.tensors:
            shard = t.segments[0].shard
            f = handles.get(shard) or handles.setdefault(shard, safe_open(str(src / shard), "pt"))
            rows = _source_rows(plan, t)
            if rows is None:
                tensors[t.name] = f.get_tensor(t.source)
            else:
                sl = f.get_slice(t.source)
                tensors[t.name] = torch.cat([sl[a:b] for a, b in _runs(rows)])
        save_file(tensors, str(dst / o.name), metadata={"format": "pt"})


def ours(plan: Plan, dst: Path, zero_copy: bool = True, io=None, src_options: dict | None = None) -> None:
    from core.storage import Storage
    from rewriter.exec.dest import open_destination
    from rewriter.exec.run import execute, write_output_shard

    if plan.is_dry_run:  # a per-layer plan: its shards one after another, as `rewriter dry-run` does
        src, out = Storage(plan.source_url, src_options), open_destination(str(dst))
        for o in plan.outputs:
            write_output_shard(o, src, out, zero_copy=zero_copy, io=io)
    else:
        execute(plan, str(dst), zero_copy=zero_copy, io=io, src_options=src_options)


def download_then_prune(plan: Plan, dst: Path, src_options: dict, requests: int, part: int = 16 << 20) -> None:
    """Every source shard fetched whole (ranged parts, ``requests`` at once, each written at its
    offset), then the plan carried out from the local copy."""
    from concurrent.futures import ThreadPoolExecutor

    from core.storage import Storage

    src = Storage(plan.source_url, src_options)
    local = dst.parent / (dst.name + "-download")
    local.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name in src.list_files():
        size = src.size(name)
        path = local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, size)
        jobs += [(name, fd, start, min(size, start + part)) for start in range(0, size, part)]

    def get(job: tuple[str, int, int, int]) -> None:
        name, fd, start, end = job
        os.pwrite(fd, src.read_range(name, start, end), start)

    with ThreadPoolExecutor(requests) as pool:
        list(pool.map(get, jobs))
    for fd in {j[1] for j in jobs}:
        os.close(fd)
    ours(dataclasses.replace(plan, source_url=str(local)), dst)


def ours_ray(plan: Plan, dst: Path, workers: int) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from rewriter.exec.distributed import execute_on_ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
    execute_on_ray(plan, str(dst), workers=workers)
    ray.shutdown()


def floor(plan: Plan, dst: Path) -> None:
    """Copy as many bytes as the output holds, contiguously, from the largest source shard."""
    src = Path(plan.source_url)
    total = sum(o.size for o in plan.outputs)
    shards = sorted(src.glob("*.safetensors"), key=lambda p: -p.stat().st_size)
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / "floor.bin", "wb") as out:
        left = total
        for shard in shards:
            with open(shard, "rb") as f:
                n = min(left, shard.stat().st_size)
                done = 0
                while done < n:
                    done += os.copy_file_range(f.fileno(), out.fileno(), n - done, done)
                left -= n
            if not left:
                break
        os.fsync(out.fileno())


NAMES = ("naive", "lazy", "ours", "ours-buffered", "ours-seq", "ours-buffered-seq", "ours-jobs1", "ours-jobs4",
         "ours-jobs8", "ours-seg1", "ours-seg16", "ours-1stream", "ours-ray", "floor", "download")


def _runner(name: str, plan: Plan, dst: Path, args: argparse.Namespace):
    from rewriter.exec.io import IOOptions

    io = IOOptions(inflight_bytes=args.inflight_mib << 20, inflight_requests=args.requests)
    opts = args.src_options
    return {
        "naive": lambda: naive(plan, dst),
        "lazy": lambda: lazy(plan, dst),
        "ours": lambda: ours(plan, dst, io=io, src_options=opts),
        "ours-buffered": lambda: ours(plan, dst, zero_copy=False, io=io),
        "ours-seq": lambda: ours(plan, dst, io=IOOptions(inflight_bytes=0), src_options=opts),
        "ours-buffered-seq": lambda: ours(plan, dst, zero_copy=False, io=IOOptions(inflight_bytes=0)),
        "ours-jobs1": lambda: ours(plan, dst, io=IOOptions(jobs=1)),
        "ours-jobs4": lambda: ours(plan, dst, io=IOOptions(jobs=4)),
        "ours-jobs8": lambda: ours(plan, dst, io=IOOptions(jobs=8)),
        "ours-seg1": lambda: ours(plan, dst, io=IOOptions(segment_threads=1)),
        "ours-seg16": lambda: ours(plan, dst, io=IOOptions(segment_threads=16)),
        "ours-1stream": lambda: ours(plan, dst, io=IOOptions(inflight_requests=1), src_options=opts),
        "ours-ray": lambda: ours_ray(plan, dst, args.workers),
        "floor": lambda: floor(plan, dst),
        "download": lambda: download_then_prune(plan, dst, opts or {}, args.requests),
    }[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench_io.contenders")
    ap.add_argument("name", choices=[*NAMES])
    ap.add_argument("plan")
    ap.add_argument("dst")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--src-options", type=json.loads, default=None, help="fsspec options of a remote source")
    ap.add_argument("--requests", type=int, default=16, help="requests in flight (remote)")
    ap.add_argument("--inflight-mib", type=int, default=256)
    args = ap.parse_args(argv)
    plan = Plan.load(args.plan)
    dst = Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    run = _runner(args.name, plan, dst, args)
    run()
    if args.name.startswith(("naive", "lazy", "ours", "download")):
        for f in dst.glob("*.safetensors"):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    json.dump({"ok": True}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
