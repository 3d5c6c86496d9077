"""Ray benchmark: the local executor (its default ``--jobs``, and ``--jobs 1``: one shard at a
time, as one actor writes) vs ``run --ray`` with 1, 2 and 4 workers on one plan, and where the
driver's time goes.

``python -m bench_io.raybench [--size default|tiny] [--work DIR] [--rounds 2] [--workers 1,2,4]``

The plan is a synthetic 120B-geometry subset (real-size MoE layers of 128 experts, 2880 wide;
a small vocabulary) pruned to half its experts. Every run is a fresh process (cache of the
source and the output dropped first) that profiles itself with cProfile around the rewrite
call, and reports:

* ``wall_s``: the whole process; ``init_s``: starting the local Ray instance (``ray.init``), a
  cost a standing cluster does not pay; ``run_s``: the rewrite call itself;
* the driver's time inside ``run_s`` (main thread, from the profile): ``wait_s`` blocked in
  ``ray.get``/``ray.wait`` for actors, ``commit_s`` publishing shards written in parts (fsync and
  rename; ``hash_s``: any reading back of a shard for its sha256, counted within it), ``journal_s``,
  ``finalize_s`` (config, provenance, index), ``setup_s`` (actors started and stopped),
  ``copy_s`` (a local run's own copying), and ``other_s``: everything else;
* ``driver_cpu_s``: CPU time of the driver process (its own threads; actors are other processes).

Rounds alternate the contenders, each round starting one further along (local, local-1, ray-1,
ray-2, ray-4; then local-1, ray-1, ray-2, ray-4, local; ...), so that load from other work on the machine and the
position in a round fall on all of them; every run is kept in the JSON, the tables show the
fastest. Results: ``bench_io/results/ray-latest.{json,md}`` and a dated copy
(``ray-YYYYMMDD-HHMM.*``), with the machine, its load and the date. The scaling model (:func:`planners.cost.estimate_nodes`) is fitted to the one-worker run
and checked against the others, then applied to the full 120B plan.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench_io.bench import RESULTS, drop_cache, machine, measure
from planners import PlanOptions, plan_prune
from planners.policies import KeepPolicy
from rewriter.tools.synth import PRESETS, Geometry, synthetic_saliency, write_checkpoint

GEOMETRIES = {
    # Four real-size 120B MoE layers: a 6.8 GB source, 3.4 GB written in 2 GB shards.
    "default": (Geometry(4, 128, 4, 2880, 2880, 1024, 64, 8, 64, 4_800_000_000), 2_000_000_000),
    "tiny": (Geometry(2, 16, 2, 64, 64, 256, 4, 2, 16, 100_000), 60_000),
}


# --- one run, in its own process -------------------------------------------------------------------

def one_run(mode: str, plan_path: str, dst: str, workers: int, report: str) -> None:
    """Rewrite ``plan_path`` into ``dst`` (``local`` or ``ray``) under cProfile; write ``report``."""
    from planners.plan import Plan

    plan = Plan.load(plan_path)
    init_s = 0.0
    if mode == "ray":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
        init_s = time.perf_counter() - t
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    if mode == "ray":
        from rewriter.exec.distributed import execute_on_ray

        result = execute_on_ray(plan, dst, workers=workers)
    else:
        from rewriter.exec.io import IOOptions
        from rewriter.exec.run import execute

        # workers 0: the local default (--jobs from the cores and the plan); N: --jobs N.
        result = execute(plan, dst, io=IOOptions(jobs=workers or None))
    prof.disable()
    run_s = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    doc = {"mode": mode, "workers": workers, "init_s": init_s, "run_s": run_s,
           "driver_cpu_s": usage.ru_utime + usage.ru_stime, "bytes_written": result.bytes_written,
           "actor_io_s": sum(s.read_seconds + s.write_seconds + s.copy_seconds for s in result.shards),
           "driver": driver_breakdown(pstats.Stats(prof), run_s)}
    Path(report).write_text(json.dumps(doc, indent=1))
    if mode == "ray":
        import ray

        ray.shutdown()


def _ct(stats: pstats.Stats, names: tuple[str, ...], file_part: str) -> float:
    """Cumulative time of the functions ``names`` defined in a file whose path holds ``file_part``
    (outermost calls only: a recursive call's time is counted once by cProfile's ``ct``)."""
    total = 0.0
    for (filename, _, func), (_, _, _, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if func in names and file_part in filename.replace(os.sep, "/"):
            total += ct
    return total


def driver_breakdown(stats: pstats.Stats, run_s: float) -> dict[str, Any]:
    """Where the driver's main thread spent ``run_s``, from its profile."""
    parts = {
        "wait_s": _ct(stats, ("get", "wait"), "ray/_private/worker.py"),
        "hash_s": _ct(stats, ("sha256_fd",), "rewriter/exec/"),
        "journal_s": _ct(stats, ("record",), "rewriter/exec/dest/journal.py"),
        "finalize_s": _ct(stats, ("finalize",), "rewriter/exec/run/executor.py"),
        "prepare_s": _ct(stats, ("prepare_destination", "pending_shards"), "rewriter/exec/dest/journal.py"),
        # A local run's copying: its shards, on this thread or on its jobs' threads while this one waits.
        "copy_s": _ct(stats, ("run_here",), "rewriter/exec/run/executor.py"),
        "commit_s": _ct(stats, ("commit_parts",), "rewriter/exec/"),
    }
    inner = _ct(stats, ("execute",), "rewriter/exec/run/executor.py")
    parts["setup_s"] = max(0.0, run_s - inner) if _ct(stats, ("execute_on_ray",), "ray_executor") else 0.0
    # The hash is counted within the commit where the commit does it (the larger of the two).
    counted = sum(v for k, v in parts.items() if k not in ("hash_s", "commit_s"))
    parts["other_s"] = max(0.0, run_s - counted - max(parts["hash_s"], parts["commit_s"]))
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:12]  # type: ignore[attr-defined]
    parts["top_tottime"] = [{"function": f"{Path(f).name}:{line}:{fn}", "tottime_s": round(v[2], 3),
                             "calls": v[1]} for (f, line, fn), v in top]
    return parts


# --- the benchmark --------------------------------------------------------------------------------

def prepare(work: Path, size: str, log: Any = print) -> Path:
    """The source checkpoint (written once) and its plan."""
    g, max_shard = GEOMETRIES[size]
    src = work / f"ray-src-{size}"
    if not (src / "model.safetensors.index.json").exists():
        log(f"writing the source checkpoint {src}")
        write_checkpoint(src, g)
    sal = work / f"ray-saliency-{size}.json"
    synthetic_saliency(g.num_layers, g.num_experts, g.top_k, seed=7).save(sal)
    plan = plan_prune(str(src), PlanOptions(saliency=(str(sal),), policy=KeepPolicy(keep_frac=0.5),
                                            max_shard_bytes=max_shard))
    path = work / f"ray-plan-{size}.json"
    plan.save(str(path))
    return path


def contender_run(name: str, plan: Path, work: Path, log: Any = print) -> dict[str, Any]:
    mode, _, n = name.partition("-")
    dst, report = work / f"ray-out-{name}", work / f"ray-report-{name}.json"
    shutil.rmtree(dst, ignore_errors=True)
    report.unlink(missing_ok=True)
    from planners.plan import Plan

    drop_cache(Path(Plan.load(str(plan)).source_url))
    os.sync()  # the previous run's deleted output is not written back during this one
    cmd = [sys.executable, "-m", "bench_io.raybench", "one", mode, str(plan), str(dst), "--workers", n or "0",
           "--report", str(report)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    t_load = os.getloadavg()[0]
    m = measure(cmd, dst, "ray", name, env)
    doc = json.loads(report.read_text()) if m.ok else {"error": m.note}
    doc.update(name=name, wall_s=m.wall_s, peak_rss_bytes=m.peak_rss_bytes, ok=m.ok, load_before=t_load)
    shutil.rmtree(dst, ignore_errors=True)
    drv = doc.get("driver", {})
    log(f"  {name:<7} wall {m.wall_s:6.2f} s  init {doc.get('init_s', 0):5.2f}  run {doc.get('run_s', 0):6.2f}  "
        f"wait {drv.get('wait_s', 0):6.2f}  commit {drv.get('commit_s', 0):5.2f}  other {drv.get('other_s', 0):5.2f}  "
        f"load {t_load:.1f}  {'ok' if m.ok else 'FAILED ' + m.note[-200:]}")
    return doc


def scaling(plan_path: Path, best: dict[str, dict[str, Any]], work: Path) -> dict[str, Any]:
    """The N-node model fitted to the one-worker run, checked against the others, and the 120B."""
    from planners.cost import estimate_nodes
    from planners.plan import Plan

    plan = Plan.load(str(plan_path))
    one = best.get("ray-1")
    if not one or "run_s" not in one:
        return {}
    fixed = one["driver"]["setup_s"] + one["driver"]["finalize_s"] + one["driver"]["prepare_s"]
    bw = one["bytes_written"] / max(one["run_s"] - fixed, 1e-9)
    # One machine: every worker shares its disk, whose rate the local run measures.
    local = best.get("local")
    disk = local["bytes_written"] / local["run_s"] if local and local.get("run_s") else None
    check = []
    for name, r in sorted(best.items()):
        if name.startswith("ray-") and "run_s" in r:
            hashed = r["driver"]["hash_s"]
            serial = r["bytes_written"] / hashed if hashed > 0.05 else None
            est = estimate_nodes(plan, r["workers"], bw, startup_s=fixed)
            one_disk = estimate_nodes(plan, r["workers"], bw, startup_s=fixed, total_bytes_per_s=disk,
                                      serial_bytes_per_s=serial)
            check.append({"workers": r["workers"], "predicted_s": round(est.est_seconds, 2),
                          "predicted_one_disk_s": round(one_disk.est_seconds, 2), "measured_s": round(r["run_s"], 2),
                          "tasks": est.tasks, "driver_hash_bytes_per_s": serial})
    rates = [c["driver_hash_bytes_per_s"] for c in check if c["driver_hash_bytes_per_s"]]
    return {"fitted_bytes_per_s": bw, "fixed_s": fixed, "disk_bytes_per_s": disk, "check": check,
            "full_120b": full_120b(work, max(rates) if rates else None)}


def full_120b(work: Path, serial: float | None) -> list[dict[str, Any]]:
    """The full 120B plan (keep half, 5 GB shards; a sparse source) at 0.5 and 1 GB/s per node,
    with writers that hash as they write, and with a driver re-hashing each assembled shard at
    ``serial`` bytes/s (the fastest rate measured here)."""
    from planners.cost import estimate_nodes

    src = work / "120b-sparse"
    if not (src / "model.safetensors.index.json").exists():
        write_checkpoint(src, PRESETS["120b"], sparse=True)
    sal = work / "120b-saliency.json"
    synthetic_saliency(36, 128, 4).save(sal)
    plan = plan_prune(str(src), PlanOptions(saliency=(str(sal),), policy=KeepPolicy(keep_frac=0.5)))
    rows = []
    for bw in (0.5e9, 1e9):
        for n in (1, 2, 4, 8, 16, 32):
            e = estimate_nodes(plan, n, bw, startup_s=10.0)
            h = estimate_nodes(plan, n, bw, startup_s=10.0, serial_bytes_per_s=serial) if serial else None
            rows.append({"nodes": n, "node_bytes_per_s": bw, "est_seconds": round(e.est_seconds, 1),
                         "est_seconds_serial_hash": round(h.est_seconds, 1) if h else None, "serial_bytes_per_s": serial,
                         "tasks": e.tasks, "busy_nodes": e.busy_nodes, "bytes_written": e.bytes_written})
    return rows


def run(size: str = "default", work: Path | None = None, results: Path = RESULTS, rounds: int = 2,
        workers: tuple[int, ...] = (1, 2, 4), log: Any = print) -> dict[str, Any]:
    """Every contender ``rounds`` times, alternating; write ``ray-latest.{json,md}`` to ``results``."""
    work = work or Path("bench-work")
    work.mkdir(parents=True, exist_ok=True)
    plan = prepare(work, size, log)
    names = ["local", "local-1", *(f"ray-{n}" for n in workers)]
    started = time.time()
    runs = []
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]  # each contender in each position in turn
        log(f"round {i + 1} of {rounds}: {', '.join(order)}")
        runs += [contender_run(name, plan, work, log) for name in order]
    best = {}
    for name in names:
        ok = [r for r in runs if r["name"] == name and r["ok"]]
        if ok:
            best[name] = min(ok, key=lambda r: r["wall_s"])
    from planners.plan import Plan

    p = Plan.load(str(plan))
    doc = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)), "size": size,
        "machine": machine() | {"load_avg_start": os.getloadavg()},
        "plan": {"bytes_written": sum(o.size for o in p.outputs), "output_shards": len(p.outputs),
                 "source_bytes": sum(int(fp["size"]) for fp in p.source_shards.values())},
        "rounds": rounds, "runs": runs, "best": best, "scaling": scaling(plan, best, work),
    }
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(started))
    for name in ("ray-latest", f"ray-{stamp}"):  # the latest, and every run kept by its date
        (results / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        (results / f"{name}.md").write_text(markdown(doc))
    return doc


def markdown(doc: dict[str, Any]) -> str:
    m, p = doc["machine"], doc["plan"]
    lines = [
        f"# Ray benchmark ({doc['date_utc']} UTC, size {doc['size']})", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; load average at the start "
        f"{', '.join(f'{x:.1f}' for x in m['load_avg_start'])} (other work shared the machine).",
        f"Plan: {p['source_bytes'] / 1e9:.2f} GB source, {p['bytes_written'] / 1e9:.2f} GB written in "
        f"{p['output_shards']} shards. {doc['rounds']} rounds alternating; the fastest run of each shown, "
        f"every run in the JSON.", "",
        "| contender | wall s | ray.init s | run s | vs local (run) | driver wait s | commit s (hash s) | "
        "journal s | finalize s | setup s | other s | driver CPU s | driver share of run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    local = doc["best"].get("local", {}).get("run_s")
    for name, r in doc["best"].items():
        d = r["driver"]
        busy = r["run_s"] - d["wait_s"] if name != "local" else r["run_s"]
        lines.append(
            f"| {name} | {r['wall_s']:.2f} | {r['init_s']:.2f} | {r['run_s']:.2f} | "
            f"{r['run_s'] / local:.2f}x | {d['wait_s']:.2f} | {d['commit_s']:.2f} ({d['hash_s']:.2f}) | {d['journal_s']:.2f} | "
            f"{d['finalize_s']:.2f} | {d['setup_s']:.2f} | {d['other_s']:.2f} | {r['driver_cpu_s']:.2f} | "
            f"{busy / r['run_s']:.0%} |" if local else f"| {name} | {r['wall_s']:.2f} | ... |")
    lines += ["", "All runs (wall s / run s): " + "; ".join(
        f"{r['name']} {r['wall_s']:.2f}/{r.get('run_s', float('nan')):.2f}" for r in doc["runs"])]
    s = doc.get("scaling")
    if s:
        disk = s.get("disk_bytes_per_s") or 0
        hashing = any(c["driver_hash_bytes_per_s"] for c in s["check"])
        lines += ["", f"Scaling model fitted to ray-1: {s['fitted_bytes_per_s'] / 1e6:.0f} MB/s per worker, "
                  f"{s['fixed_s']:.2f} s fixed; one disk: {disk / 1e6:.0f} MB/s (the local run)"
                  + (", and the driver's serial re-hash at the rate measured in each run." if hashing else
                     "; the driver re-reads nothing (actors hash what they write)."), "",
                  "| workers | predicted, independent nodes (s) | predicted, one disk + serial hash (s) | measured run s |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {c['workers']} | {c['predicted_s']} | {c['predicted_one_disk_s']} | {c['measured_s']} |"
                  for c in s["check"]]
        full = s["full_120b"]
        serial = full[0]["serial_bytes_per_s"] if full else None
        lines += ["", f"Full 120B (keep half, 5 GB shards, {full[0]['bytes_written'] / 1e9:.1f} GB written), 10 s fixed"
                  + (f"; the last column with the driver re-reading each assembled shard for its hash at "
                     f"{serial / 1e6:.0f} MB/s (measured here):" if serial else
                     " (no serial driver step was measured, so the last column is empty):"), "",
                  "| nodes | per node | est. s | tasks | busy nodes | est. s, serial driver hash |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['nodes']} | {r['node_bytes_per_s'] / 1e9:.1f} GB/s | {r['est_seconds']} | {r['tasks']} | "
                  f"{r['busy_nodes']} | {r['est_seconds_serial_hash'] or '-'} |" for r in full]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench_io.raybench")
    sub = ap.add_subparsers(dest="cmd")
    one = sub.add_parser("one", help="one run in this process (used by the benchmark)")
    one.add_argument("mode", choices=["local", "ray"])
    one.add_argument("plan")
    one.add_argument("dst")
    one.add_argument("--workers", type=int, default=1, help="Ray actors; for a local run, --jobs (0: its default)")
    one.add_argument("--report", required=True)
    ap.add_argument("--size", choices=sorted(GEOMETRIES), default="default")
    ap.add_argument("--work", type=Path, default=Path("bench-work"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", default="1,2,4", help="comma-separated Ray worker counts")
    args = ap.parse_args(argv)
    if args.cmd == "one":
        one_run(args.mode, args.plan, args.dst, args.workers, args.report)
    else:
        run(args.size, args.work, args.results, args.rounds, tuple(int(w) for w in args.workers.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
