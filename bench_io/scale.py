"""The planner at the full geometry of the largest MoE presets: every step a user runs before a
rewrite, each as a fresh ``rewriter`` process, timed with its peak RSS.

``python -m bench_io.scale --preset kimi-k2,deepseek-v3 --repeat 3 --out scale.json``
    writes each preset ``--sparse`` (real headers over holes: 0.7-1 TB of geometry in tens of MB
    of disk) in a temporary folder, then runs ``inspect``, ``synth-saliency``, ``plan
    --keep-frac 0.5`` (its cost table) and ``dry-run --layer N`` (that layer's kept experts
    written to a scratch folder and removed) ``--repeat`` times; reports best and median wall
    time, peak RSS, the plan file's size per layer and per copy range, the load average, and
    writes ``scale.json`` and ``scale.md`` (a markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_MiB = 1 << 20


def run_step(args: list[str], cwd: Path) -> dict[str, Any]:
    """``python -m rewriter ARGS`` as a fresh process: wall time, peak RSS (its own, from wait4),
    exit status and the last lines of its output."""
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rewriter", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
            "exit": proc.returncode, "load_1min": load, "output": text[-3000:]}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}


def facts_apart(preset: str, plan: Path, output: str, moe_layers: int) -> list[Any]:
    """The preset's tensor count, :func:`plan_facts` and :func:`node_estimates`, in a process of
    their own: reading a 1 T plan here would raise this process's RSS by 200 MiB, and a process it
    starts begins with its parent's RSS as its peak, so every later step would report it as its own."""
    code = ("import json, sys; from pathlib import Path; from bench_io.scale import plan_facts, node_estimates; "
            "from rewriter.tools.synth_moe import MOE_PRESETS, all_tensors; p = Path(sys.argv[2]); "
            "print(json.dumps([len(all_tensors(MOE_PRESETS[sys.argv[1]])), "
            "plan_facts(p, sys.stdin.read(), int(sys.argv[3])), node_estimates(p)]))")
    done = subprocess.run([sys.executable, "-c", code, preset, str(plan), str(moe_layers)], input=output,
                          env=_env(), capture_output=True, text=True, check=True)
    return list(json.loads(done.stdout))


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [r["wall_s"] for r in runs]
    return {"best_s": min(walls), "median_s": statistics.median(walls), "best_cpu_s": min(r["cpu_s"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "runs": len(runs),
            "load_1min": [round(r["load_1min"], 2) for r in runs], "exit": sorted({r["exit"] for r in runs})}


def disk_use(folder: Path) -> dict[str, int]:
    files = [p for p in folder.iterdir() if p.is_file()]
    return {"apparent_bytes": sum(p.stat().st_size for p in files),
            "on_disk_bytes": sum(p.stat().st_blocks * 512 for p in files)}


def plan_facts(plan: Path, output: str, moe_layers: int) -> dict[str, Any]:
    """The plan file's size, per MoE layer and per copy range (the count the cost table prints)."""
    size = plan.stat().st_size
    m = re.search(r"([\d,]+) copy ranges", output)
    ranges = int(m.group(1).replace(",", "")) if m else 0
    doc = json.loads(plan.read_text())
    tensors = sum(len(o["tensors"]) for o in doc["outputs"])
    headers = sum(len(o.get("header", "")) for o in doc["outputs"])
    return {"plan_bytes": size, "copy_ranges": ranges, "output_shards": len(doc["outputs"]),
            "output_tensors": tensors, "header_bytes": headers, "plan_bytes_per_moe_layer": size // max(moe_layers, 1),
            "plan_bytes_per_copy_range": size // max(ranges, 1), "plan_bytes_per_output_tensor": size // max(tensors, 1)}


def node_estimates(plan_path: Path) -> list[dict[str, Any]]:
    """The Ray scaling model (:func:`planners.cost.estimate_nodes`, as ``bench_io.raybench``
    applies it to 120B) on this plan: 1-32 nodes at 0.5 and 1 GB/s of output per node (one
    node's rate measured by raybench: ~0.5 GB/s), 10 s to start; extrapolated, not measured."""
    from planners.cost import estimate_nodes
    from planners.plan import Plan

    plan = Plan.load(str(plan_path))
    rows = []
    for bw in (0.5e9, 1e9):
        for n in (1, 2, 4, 8, 16, 32):
            e = estimate_nodes(plan, n, bw, startup_s=10.0)
            rows.append({"nodes": n, "node_bytes_per_s": bw, "est_seconds": round(e.est_seconds, 1),
                         "tasks": e.tasks, "bytes_written": e.bytes_written})
    return rows


def measure_preset(preset: str, layer: int, repeat: int, work: Path) -> dict[str, Any]:
    from rewriter.tools.synth_moe import MOE_PRESETS

    g = MOE_PRESETS[preset]
    src = work / preset
    made = run_step(["synth", "--preset", preset, "--sparse", "--quiet", str(src)], work)
    if made["exit"] != 0:
        return {"error": made["output"]}
    sal, plan = work / f"{preset}.saliency.json", work / f"{preset}.plan.json"
    steps: dict[str, list[dict[str, Any]]] = {}

    def step(name: str, args: list[str], before: Any = None) -> None:
        for _ in range(repeat):
            if before:
                before()
            steps.setdefault(name, []).append(run_step(args, work))

    step("inspect", ["inspect", str(src)])
    step("synth-saliency", ["synth-saliency", str(src), "--out", str(sal), "--force"])
    step("plan", ["plan", str(src), "--saliency", str(sal), "--keep-frac", "0.5", "--out", str(plan)],
         before=lambda: plan.unlink(missing_ok=True))
    step("dry-run", ["dry-run", str(src), "--layer", str(layer), "--saliency", str(sal), "--keep-frac", "0.5",
                     "--scratch", str(work / "scratch")])
    moe = g.num_layers - g.dense_layers + g.mtp_layers
    count, facts, nodes = facts_apart(preset, plan, steps["plan"][-1]["output"], moe)
    out = {"preset": preset, "tensors": count, "moe_layers": moe, "synth": summary([made]),
           "disk": disk_use(src), "steps": {k: summary(v) for k, v in steps.items()}, "plan": facts,
           "dry_run_output": steps["dry-run"][-1]["output"][-1500:], "plan_output": steps["plan"][-1]["output"][-1200:],
           "ray_nodes_extrapolated": nodes}
    shutil.rmtree(src, ignore_errors=True)
    return out


def markdown(doc: dict[str, Any]) -> str:
    rows = ["| preset | tensors | shards on disk | inspect | synth-saliency | plan (best / median wall, best CPU, peak RSS) | "
            "plan file | per MoE layer | per copy range | dry-run one layer |", "|" + "---|" * 10]
    for name, p in doc["presets"].items():
        if "error" in p:
            rows.append(f"| {name} | error | | | | | | | | |")
            continue
        s = p["steps"]

        def cell(k: str, s: dict[str, Any] = s) -> str:
            return (f"{s[k]['best_s']:.2f} s / {s[k]['median_s']:.2f} s ({s[k]['best_cpu_s']:.2f} s CPU), "
                    f"{s[k]['peak_rss_mib']:.0f} MiB")

        rows.append(f"| {name} | {p['tensors']:,} | {p['disk']['on_disk_bytes'] / _MiB:.0f} MiB of "
                    f"{p['disk']['apparent_bytes'] / 1e12:.2f} TB | {cell('inspect')} | {cell('synth-saliency')} | "
                    f"{cell('plan')} | {p['plan']['plan_bytes'] / 1e6:.1f} MB | "
                    f"{p['plan']['plan_bytes_per_moe_layer'] / 1e3:.0f} kB | {p['plan']['plan_bytes_per_copy_range']} B | "
                    f"{cell('dry-run')} |")
    rows += ["", "Rewrite of the whole plan on N Ray nodes (scaling model, extrapolated; GB/s of output per node):",
             "", "| preset | GB/s | " + " | ".join(f"{n} nodes" for n in (1, 2, 4, 8, 16, 32)) + " |", "|---|---|" + "---|" * 6]
    for name, p in doc["presets"].items():
        for bw in (0.5e9, 1e9):
            est = [r for r in p.get("ray_nodes_extrapolated", []) if r["node_bytes_per_s"] == bw]
            if est:
                rows.append(f"| {name} | {bw / 1e9:g} | " + " | ".join(f"{r['est_seconds'] / 60:.1f} min" for r in est) + " |")
    return "\n".join(rows) + f"\n\n{doc['machine']}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="kimi-k2,deepseek-v3")
    ap.add_argument("--layer", type=int, default=3, help="The MoE layer dry-run rewrites.")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="Folder for the sparse checkpoints (default: a temporary one).")
    ap.add_argument("--out", type=Path, required=True, help="JSON results; a .md table is written beside it.")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="rewriter-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
                           "machine": f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}",
                           "presets": {}}
    try:
        for preset in args.preset.split(","):
            doc["presets"][preset] = measure_preset(preset, args.layer, args.repeat, work)
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
