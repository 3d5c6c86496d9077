"""The remote benchmark: a rewrite whose source sits on a shaped object store.

The loopback S3 server (:mod:`bench_io.s3server`, ranged GETs served from the object's buffer)
behind :class:`bench_io.shaper.ShapedProxy`: a fixed delay per request and a bandwidth cap per
connection (defaults 30 ms and 100 MB/s, recorded in the results). Contenders, each a fresh
process (:mod:`bench_io.contenders`):

* ``ours-seq``: the sequential path of earlier versions (one request at a time, ``--max-inflight-mib 0``);
* ``ours-1stream``: the concurrent path with one request in flight;
* ``ours``: the concurrent path (``--max-inflight-requests`` and ``--max-inflight-mib``);
* ``download``: every source shard downloaded whole with as many ranged requests in flight, then
  pruned locally (what a user would otherwise do);
* ``ours (store unshaped)``: ``ours`` again without the delay and the bandwidth cap, to show how
  fast the loopback server and the proxy serve at most on this machine.

Per contender: wall time, bytes and requests the store served, the most requests and requested
bytes in flight at once, peak RSS, the output's shard digests (all equal), and the time
:func:`planners.cost.estimate` predicts at the same settings, alone and told the rate the
unshaped store served (``--link-mbps``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench_io.bench import Measurement, _source, machine, measure
from bench_io.charts import pyplot, ratio_rows
from bench_io.s3server import start_s3
from bench_io.shaper import ShapedProxy
from planners import PlanOptions, plan_prune
from planners.cost import estimate
from planners.plan import Plan
from planners.policies import KeepPolicy
from rewriter.tools.synth import Geometry

CONTENDERS = ("ours-seq", "ours-1stream", "ours", "download")
MiB = 1 << 20


def _digests(d: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for p in sorted(d.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def _predict(plan: Plan, contender: str, delay_s: float, bps: float, requests: int, inflight_mib: int,
             link: float = 0.0) -> float | None:
    """What ``rewriter plan --read-mbps --latency-ms --inflight [--link-mbps]`` predicts."""
    inflight = {"ours-seq": 0, "ours-1stream": 1, "ours": requests}.get(contender)
    if inflight is None:
        return None
    return estimate(plan, read_bytes_per_s=bps, latency_s=delay_s, inflight=inflight,
                    inflight_bytes=inflight_mib * MiB, link_bytes_per_s=link).est_seconds


def run_remote(g: Geometry, work: Path, *, source_name: str, delay_s: float = 0.03, conn_bytes_per_s: float = 100e6,
               requests: int = 16, inflight_mib: int = 256, contenders: tuple[str, ...] = CONTENDERS,
               log=print) -> dict[str, Any]:
    src, sal = _source(work, source_name, g, log)
    server = start_s3(work / "moto-remote.log", ranged_reads=True)
    proxy = None
    try:
        server.make_bucket("bench")
        log("  uploading the source to the loopback S3 server")
        server.upload_dir(src, "bench/src")
        keep = g.num_experts // 2
        plan = plan_prune("s3://bench/src", PlanOptions(storage_options=server.options, saliency=(str(sal),),
                                                        policy=KeepPolicy(keep_n=keep)))
        plan_path = work / "remote-plan.json"
        plan.save(str(plan_path))
        proxy = ShapedProxy(server.endpoint, delay_s, conn_bytes_per_s).start()
        opts = {**server.options, "client_kwargs": {**server.options["client_kwargs"], "endpoint_url": proxy.endpoint}}
        rows = [_one(name, plan, plan_path, work, opts, proxy, delay_s, conn_bytes_per_s, requests, inflight_mib, log)
                for name in contenders]
        # The same store without delay or bandwidth cap: what the loopback server and proxy serve at most.
        proxy.delay_s, proxy.conn_bytes_per_s = 0.0, 1e15
        row = _one("ours", plan, plan_path, work, opts, proxy, 0.0, 1e15, requests, inflight_mib, log)
        rows.append(row | {"contender": "ours (store unshaped)", "predicted_s": None})
        # The model again, told what the unshaped store served (its rate over the whole run).
        link = row["bytes_fetched"] / row["wall_s"] if row["ok"] else 0.0
        for r in rows[:-1]:
            r["predicted_at_store_rate_s"] = _predict(plan, r["contender"], delay_s, conn_bytes_per_s, requests,
                                                      inflight_mib, link)
        rows[-1]["predicted_at_store_rate_s"] = None
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
    written = sum(o.size for o in plan.outputs)
    return {
        "shaping": {"delay_ms": delay_s * 1000, "conn_mb_per_s": conn_bytes_per_s / 1e6,
                    "requests_in_flight": requests, "inflight_mib": inflight_mib},
        "geometry": dataclasses.asdict(g), "keep": g.num_experts // 2,
        "source_bytes": sum(int(fp["size"]) for fp in plan.source_shards.values()),
        "bytes_written": written,
        "identical_outputs": len({json.dumps(r.pop("digests"), sort_keys=True) for r in rows if r["ok"]}) == 1,
        "rows": rows,
    }


def _one(name: str, plan: Plan, plan_path: Path, work: Path, opts: dict[str, Any], proxy: ShapedProxy,
         delay_s: float, bps: float, requests: int, inflight_mib: int, log) -> dict[str, Any]:
    dst = work / f"out-remote-{name}"
    for d in (dst, work / f"out-remote-{name}-download"):
        shutil.rmtree(d, ignore_errors=True)
    dst.mkdir(parents=True)
    cmd = [sys.executable, "-m", "bench_io.contenders", name, str(plan_path), str(dst), "--src-options", json.dumps(opts),
           "--requests", str(requests), "--inflight-mib", str(inflight_mib)]
    proxy.reset()
    m: Measurement = measure(cmd, dst, "remote", name)
    seen = proxy.reset()
    predicted = _predict(plan, name, delay_s, bps, requests, inflight_mib)
    row = dataclasses.asdict(m) | {
        "bytes_fetched": seen.body_bytes, "requests": seen.requests, "ranged_gets": seen.ranged_gets,
        "max_requests_in_flight": seen.max_in_flight, "max_bytes_in_flight": seen.max_bytes_in_flight,
        "predicted_s": predicted, "digests": _digests(dst) if m.ok else {},
    }
    log(f"  remote     {name:<14} {m.wall_s:7.2f} s  fetched {seen.body_bytes / 1e6:8.0f} MB in {seen.requests} "
        f"requests (max {seen.max_in_flight} / {seen.max_bytes_in_flight / MiB:.0f} MiB in flight)  "
        f"peak RSS {m.peak_rss_bytes / MiB:5.0f} MiB  predicted {predicted if predicted is None else round(predicted, 1)} s"
        f"  {'ok' if m.ok else 'FAILED ' + m.note}")
    for d in (dst, work / f"out-remote-{name}-download"):
        shutil.rmtree(d, ignore_errors=True)
    return row


def ratios(doc: dict[str, Any]) -> dict[str, float]:
    by = {r["contender"]: r for r in doc["rows"] if r["ok"]}
    out: dict[str, float] = {}
    if "ours" in by:
        ours = by["ours"]
        for other in ("ours-1stream", "ours-seq", "download"):
            if other in by:
                out[f"remote: {other} / ours time"] = by[other]["wall_s"] / ours["wall_s"]
        out["remote: ours bytes fetched / written"] = ours["bytes_fetched"] / doc["bytes_written"]
        out["remote: ours peak RSS MiB - in-flight budget MiB"] = (
            ours["peak_rss_bytes"] / MiB - doc["shaping"]["inflight_mib"])
    for name, r in by.items():
        if r["predicted_s"]:
            out[f"remote: {name} measured / predicted time"] = r["wall_s"] / r["predicted_s"]
    return out


def markdown(doc: dict[str, Any]) -> str:
    s = doc["shaping"]
    lines = [
        f"## Remote source on a shaped object store ({doc['date']})",
        "",
        f"Loopback S3 (moto) behind a proxy adding {s['delay_ms']:.0f} ms per request and capping each connection "
        f"at {s['conn_mb_per_s']:.0f} MB/s; `ours`/`download` keep {s['requests_in_flight']} requests and at most "
        f"{s['inflight_mib']} MiB in flight. Source {doc['source_bytes'] / 1e6:.0f} MB (120B geometry, "
        f"{doc['geometry']['num_layers']} layers), keep {doc['keep']}, {doc['bytes_written'] / 1e6:.0f} MB written. "
        f"Outputs identical across contenders: {doc['identical_outputs']}. Machine: {doc['machine']['cpu']}, "
        f"{doc['machine']['cores']} cores.",
        "",
        "| contender | wall s | predicted s | predicted s at the store's rate | fetched MB | requests | "
        "max requests in flight | max MiB in flight | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        pred = "" if r["predicted_s"] is None else f"{r['predicted_s']:.1f}"
        at_rate = r.get("predicted_at_store_rate_s")
        pred += " | " + ("" if at_rate is None else f"{at_rate:.1f}")
        lines.append(f"| {r['contender']}{'' if r['ok'] else ' (failed)'} | {r['wall_s']:.2f} | {pred} | "
                     f"{r['bytes_fetched'] / 1e6:.0f} | {r['requests']} | {r['max_requests_in_flight']} | "
                     f"{r['max_bytes_in_flight'] / MiB:.0f} | {r['peak_rss_bytes'] / MiB:.0f} |")
    lines += ["", *ratio_rows(doc["ratios"])]
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in doc["rows"] if r["ok"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["contender"] for r in rows]
    a.bar(names, [r["wall_s"] for r in rows], color="tab:blue", label="measured")
    a.scatter([n for n, r in zip(names, rows) if r["predicted_s"]], [r["predicted_s"] for r in rows if r["predicted_s"]],
              color="black", marker="_", s=400, label="predicted (rewriter plan)", zorder=3)
    a.set_ylabel("wall seconds")
    a.legend()
    a.set_title("Remote rewrite time")
    b.bar(names, [r["bytes_fetched"] / 1e6 for r in rows], color="tab:green")
    b.set_ylabel("MB fetched from the store")
    b.set_title("Bytes fetched")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    s = doc["shaping"]
    fig.suptitle(f"shaped S3: {s['delay_ms']:.0f} ms/request, {s['conn_mb_per_s']:.0f} MB/s per connection "
                 f"({doc['date']}, {doc['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(g: Geometry, work: Path, results: Path, *, source_name: str, log=print, **kw: Any) -> dict[str, Any]:
    """Run the remote benchmark; write ``remote.json``, ``remote.md`` and ``remote.png`` to ``results``."""
    doc = run_remote(g, work, source_name=source_name, log=log, **kw)
    doc["date"] = time.strftime("%Y-%m-%d")
    doc["machine"] = machine()
    doc["ratios"] = ratios(doc)
    results.mkdir(parents=True, exist_ok=True)
    (results / "remote.json").write_text(json.dumps(doc, indent=1) + "\n")
    (results / "remote.md").write_text(markdown(doc))
    chart(doc, results / "remote.png")
    return doc
