"""The ``rewriter`` command line. Heavy modules (torch, ray) are imported inside commands."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from rewriter.errors import RewriterError

MiB = 1 << 20


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RewriterError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def _json_opt(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        d = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise click.BadParameter("expected a JSON object")
    return d


@click.group()
@click.version_option(package_name="moe-rewriter")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Prune experts out of Mixture-of-Experts checkpoints by streaming byte ranges.

    Typical flow: `rewriter inspect SRC`, `rewriter plan SRC --saliency S.json --keep-frac 0.5
    --out plan.json` (prints the I/O cost), `rewriter run plan.json --out DST`, then
    `rewriter verify SRC DST`. `rewriter prune SRC DST ...` plans and runs in one go.
    """
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")


# --- synth / inspect ---------------------------------------------------------------------------

@main.command()
@click.option("--preset", required=True, help="Geometry: 20b, 120b, tiny, tiny-bf16, small.")
@click.option("--layers", type=int, default=None, help="Keep the preset's per-layer geometry with N layers.")
@click.option("--sparse", is_flag=True, help="Real headers over holes: full geometry at no disk cost.")
@click.option("--computing", is_flag=True,
              help="Weights that compute (finite, unit-scale activations): for profile and eval runs.")
@click.argument("out", type=click.Path(file_okay=False))
@_fail_cleanly
def synth(preset: str, layers: int | None, sparse: bool, computing: bool, out: str) -> None:
    """Write a synthetic gpt-oss checkpoint to OUT."""
    from bench_io.synth import computing_chunks, write_checkpoint
    from bench_io.synth import preset as get_preset

    try:
        g = get_preset(preset, layers)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--preset") from None
    if computing and sparse:
        raise click.BadParameter("a sparse checkpoint has no weights to compute with", param_hint="--computing")
    index = write_checkpoint(out, g, sparse=sparse, values=computing_chunks if computing else None)
    shards = len(set(index["weight_map"].values()))
    click.echo(f"wrote {out}: {g.num_layers} layers x {g.num_experts} experts, {shards} shards, "
               f"total_size {index['metadata']['total_size']:,}{' (sparse)' if sparse else ''}")


@main.command("synth-saliency")
@click.argument("ckpt")
@click.option("--out", required=True, help="Saliency file to write.")
@click.option("--domain", default="synthetic", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_fail_cleanly
def synth_saliency(ckpt: str, out: str, domain: str, seed: int) -> None:
    """Write plausible random saliency for CKPT (for trying the planner without a GPU)."""
    from bench_io.synth import synthetic_saliency
    from rewriter.checkpoint import Checkpoint

    c = Checkpoint.open(ckpt)
    lay = c.layout
    s = synthetic_saliency(len(lay.moe_layers(c)), lay.num_experts(c.config), lay.top_k(c.config), domain, seed)
    s.save(out)
    click.echo(f"wrote {out}: domain {domain}, {len(s.layers)} layers")


@main.command()
@click.argument("ckpt")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--storage-options", default=None, help="fsspec options as JSON (endpoint_url, key…).")
@_fail_cleanly
def inspect(ckpt: str, as_json: bool, storage_options: str | None) -> None:
    """Describe checkpoint CKPT from its headers alone: family, experts, bytes, shard locality."""
    from rewriter.inspect import describe, format_description

    info = describe(ckpt, _json_opt(storage_options))
    click.echo(json.dumps(info, indent=1) if as_json else format_description(info))


# --- planning -----------------------------------------------------------------------------------

def _options(*opts: Callable[..., Any]) -> Callable[..., Any]:
    """One decorator applying several click options, in the order listed."""

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply


policy_options = _options(
        click.option("--saliency", "saliency", multiple=True, help="Saliency file (repeat: one per domain)."),
        click.option("--weight", "weights", multiple=True, help="Domain weight DOMAIN=W for the union (default 1)."),
        click.option("--keep-list", default=None, help='JSON {"<layer>": [expert ids]} instead of saliency.'),
        click.option("--rank", type=click.Choice(["freq", "reap", "eaft_reap"]), default="reap", show_default=True,
                     help="Saliency metric to rank experts by."),
        click.option("--keep-frac", type=float, default=None, help="Share of experts kept per layer."),
        click.option("--keep-n", type=int, default=None, help="Experts kept per layer."),
        click.option("--keep-multiple", type=int, default=1, show_default=True,
                     help="Round the kept count up to a multiple of M."),
        click.option("--core-top-m", type=int, default=0, show_default=True,
                     help="Always keep each layer's M highest-ranked experts."),
        click.option("--coverage", type=float, default=0.9, show_default=True,
                     help="Share of each domain's saliency mass its experts must cover (union)."),
        click.option("--top-k", type=int, default=None, help="New routing top-k (default: unchanged)."),
        click.option("--budget", type=int, default=None,
                     help="Total experts over all layers: a non-uniform plan (not loadable by stock transformers)."),
        click.option("--allow-nonuniform", is_flag=True, help="Accept plans with different counts per layer."),
        click.option("--max-shard-size", default="5GB", show_default=True, help="Output shard size limit."),
    click.option("--storage-options", default=None, help="fsspec options for SRC as JSON."),
)


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (KeyError, ValueError):
        raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MiB") from None


def make_plan(src: str, *, layers_only: list[int] | None = None, soft: bool = False, **kw: Any):
    """Open SRC, choose keep sets from saliency or a keep list, and build the plan."""
    from planners.plan import build_plan
    from planners.policies import Domain, KeepPolicy, select_keep, validate_keep_list
    from planners.saliency import load_keep_list, load_saliency
    from rewriter.checkpoint import Checkpoint

    ckpt = Checkpoint.open(src, _json_opt(kw.get("storage_options")))
    layout = ckpt.layout
    moe = sorted(layout.moe_layers(ckpt))
    n_exp, top_k = layout.num_experts(ckpt.config), layout.top_k(ckpt.config)
    policy = KeepPolicy(rank=kw["rank"], keep_n=kw["keep_n"], keep_frac=kw["keep_frac"],
                        keep_multiple=kw["keep_multiple"], core_top_m=kw["core_top_m"],
                        coverage=kw["coverage"], top_k=kw["top_k"], budget=kw["budget"])
    if kw["keep_list"] and kw["saliency"]:
        raise click.UsageError("give --saliency or --keep-list, not both")
    prov: dict[str, Any]
    groups = layout.num_groups(ckpt.config)
    topk_group = ckpt.config.get("topk_group") if groups > 1 else None
    if kw["keep_list"]:
        keep, digest = load_keep_list(kw["keep_list"], n_exp, moe)
        decision = validate_keep_list(keep, top_k, kw["top_k"], kw["allow_nonuniform"], groups, topk_group, n_exp)
        prov = {"keep_list": {"path": kw["keep_list"], "sha256": digest}, "policy": {"top_k": kw["top_k"]}}
    else:
        weights = {}
        for w in kw["weights"]:
            name, _, val = w.partition("=")
            try:
                weights[name] = float(val)
            except ValueError:
                raise click.BadParameter(f"{w!r}: expected DOMAIN=WEIGHT", param_hint="--weight") from None
        sal = [load_saliency(p, n_exp, moe) for p in kw["saliency"]]
        unknown = set(weights) - {s.domain for s in sal}
        if unknown:
            raise click.BadParameter(f"no saliency file has domain {sorted(unknown)}", param_hint="--weight")
        domains = [Domain(s, weights.get(s.domain, 1.0)) for s in sal]
        decision = select_keep(domains, moe, n_exp, top_k, policy, groups, topk_group)
        if not decision.uniform and not kw["allow_nonuniform"] and policy.budget is None:
            raise click.UsageError("non-uniform keep counts need --allow-nonuniform")
        prov = {
            "saliency": [{"path": s.source, "sha256": s.digest, "domain": s.domain, "weight": d.weight,
                          "tokens": s.tokens} for s, d in zip(sal, domains)],
            "policy": policy.to_json(),
        }
    return build_plan(ckpt, decision, max_shard_bytes=_parse_size(kw["max_shard_size"]),
                      layers_only=layers_only, provenance=prov, soft=soft)


cost_options = _options(
        click.option("--workers", type=int, default=1, show_default=True, help="Workers for the time estimate."),
        click.option("--read-mbps", type=float, default=None, help="Per-worker read bandwidth, MB/s (default 1000)."),
        click.option("--write-mbps", type=float, default=None, help="Per-worker write bandwidth, MB/s (default 1000)."),
    click.option("--measure-bandwidth", default=None, metavar="DIR",
                 help="Measure read/write bandwidth of the disk holding DIR first."),
)


@main.command()
@click.argument("src")
@policy_options
@cost_options
@click.option("--layers", default=None, help="Comma-separated layers: a per-layer dry-run plan of their expert tensors.")
@click.option("--buffer-mib", type=int, default=16, show_default=True, help="Executor buffer (for request counts).")
@click.option("--out", "out", default=None, help="Write the plan JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the cost report as JSON.")
@_fail_cleanly
def plan(src: str, layers: str | None, buffer_mib: int, out: str | None, as_json: bool,
         workers: int, read_mbps: float | None, write_mbps: float | None, measure_bandwidth: str | None,
         **kw: Any) -> None:
    """Plan the pruning of SRC and print its I/O cost (nothing is written but --out)."""
    from planners.cost import estimate, format_report

    layers_only = [int(x) for x in layers.split(",")] if layers else None
    p = make_plan(src, layers_only=layers_only, **kw)
    if out:
        p.save(out)
    read_bw, write_bw = _bandwidths(read_mbps, write_mbps, measure_bandwidth)
    report = estimate(p, workers=workers, read_bytes_per_s=read_bw, write_bytes_per_s=write_bw,
                      buffer_bytes=buffer_mib * MiB)
    if as_json:
        click.echo(json.dumps({"plan": out, "plan_digest": p.digest, "cost": report.to_json()}, indent=1))
    else:
        click.echo(format_report(report))
        if out:
            click.echo(f"plan:       {out} ({p.digest[:12]})")


def _bandwidths(read_mbps: float | None, write_mbps: float | None, measure_dir: str | None) -> tuple[float, float]:
    read_bw, write_bw = 1e9, 1e9
    if measure_dir:
        from rewriter.probe import measure_disk

        read_bw, write_bw = measure_disk(measure_dir)
    if read_mbps:
        read_bw = read_mbps * 1e6
    if write_mbps:
        write_bw = write_mbps * 1e6
    return read_bw, write_bw


# --- execution ----------------------------------------------------------------------------------

run_options = _options(
        click.option("--buffer-mib", type=int, default=16, show_default=True,
                     help="Copy buffer in MiB; bounds the data path's memory."),
        click.option("--force", is_flag=True, help="Overwrite a destination holding other output."),
        click.option("--no-zero-copy", is_flag=True, help="Never use copy_file_range (always buffered)."),
        click.option("--drop-cache", is_flag=True, help="Drop written pages from the page cache."),
        click.option("--dst-options", default=None, help="fsspec options for DST as JSON."),
        click.option("--ray", "use_ray", is_flag=True, help="Run on Ray CPU actors (pip install '.[ray]')."),
        click.option("--address", default=None, help="Ray cluster address (default: start a local one)."),
        click.option("--workers", "ray_workers", type=int, default=2, show_default=True, help="Ray actors."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
)


def _execute(p: Any, dst: str, *, buffer_mib: int, force: bool, no_zero_copy: bool, drop_cache: bool,
             dst_options: str | None, use_ray: bool, address: str | None, ray_workers: int, quiet: bool,
             as_json: bool, allow_nonuniform: bool, src_options: dict[str, Any]) -> None:
    from planners.cost import human_bytes
    from rewriter.executor import execute
    from rewriter.progress import ByteProgress

    bar = ByteProgress(enabled=not quiet and not as_json)
    kwargs: dict[str, Any] = dict(
        src_options=src_options, dst_options=_json_opt(dst_options), buffer_bytes=buffer_mib * MiB,
        progress=bar, force=force, allow_nonuniform=allow_nonuniform, zero_copy=not no_zero_copy,
        drop_cache=drop_cache, on_start=bar.start,
    )
    if use_ray:
        from ray_jobs.executor import execute_on_ray

        result = execute_on_ray(p, dst, address=address, workers=ray_workers, **kwargs)
    else:
        result = execute(p, dst, **kwargs)
    bar.close()
    if p.skipped_files and not as_json:
        click.echo(f"left out {len(p.skipped_files)} source files ({', '.join(p.skipped_files[:3])}"
                   f"{', ...' if len(p.skipped_files) > 3 else ''}): other layouts of the same weights "
                   f"(original/, metal/) or hidden files, which would no longer match the pruned checkpoint")
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    elif result.already_complete:
        click.echo(f"{dst} already holds the complete output of this plan; nothing to do")
    else:
        resumed = sum(1 for s in result.shards if s.resumed)
        rate = result.bytes_written / result.seconds if result.seconds else 0
        click.echo(f"wrote {dst}: {len(result.shards)} shards ({resumed} resumed), "
                   f"{human_bytes(result.bytes_written)} written, {human_bytes(result.bytes_read)} read, "
                   f"{result.seconds:.2f} s ({human_bytes(rate)}/s), peak RSS {human_bytes(result.peak_rss_bytes)}")


@main.command()
@click.argument("plan_file", metavar="PLAN")
@click.option("--out", "dst", required=True, help="Destination directory or URL.")
@click.option("--allow-nonuniform", is_flag=True, help="Execute a plan stock transformers cannot load.")
@click.option("--src-options", default=None, help="fsspec options for the source as JSON.")
@run_options
@_fail_cleanly
def run(plan_file: str, dst: str, allow_nonuniform: bool, src_options: str | None, **kw: Any) -> None:
    """Execute PLAN into --out: stream the kept byte ranges, publish atomically, index last.

    Re-running the same command after an interruption resumes it.
    """
    from planners.plan import Plan

    p = Plan.load(plan_file)
    if p.is_dry_run:
        raise click.UsageError("this is a per-layer plan; execute it with `rewriter dry-run`")
    _execute(p, dst, allow_nonuniform=allow_nonuniform, src_options=_json_opt(src_options), **kw)


@main.command()
@click.argument("src")
@click.argument("dst")
@policy_options
@click.option("--plan-out", default=None, help="Also save the plan here.")
@run_options
@_fail_cleanly
def prune(src: str, dst: str, plan_out: str | None, **kw: Any) -> None:
    """Plan and run in one command: prune SRC into DST."""
    _plan_and_run(src, dst, plan_out, soft=False, kw=kw)


def _plan_and_run(src: str, dst: str, plan_out: str | None, soft: bool, kw: dict[str, Any]) -> None:
    run_keys = ("buffer_mib", "force", "no_zero_copy", "drop_cache", "dst_options", "use_ray", "address",
                "ray_workers", "quiet", "as_json")
    run_kw = {k: kw.pop(k) for k in run_keys}
    p = make_plan(src, soft=soft, **kw)
    if plan_out:
        p.save(plan_out)
    # A soft prune keeps every expert, so its per-layer counts never make it unloadable.
    _execute(p, dst, allow_nonuniform=soft or kw["allow_nonuniform"], src_options=_json_opt(kw["storage_options"]),
             **run_kw)


@main.command("soft-prune")
@click.argument("src")
@click.argument("dst")
@policy_options
@click.option("--plan-out", default=None, help="Also save the plan here.")
@run_options
@_fail_cleanly
def soft_prune(src: str, dst: str, plan_out: str | None, **kw: Any) -> None:
    """Try a keep set cheaply: copy SRC to DST with only router biases changed.

    Dropped experts' router bias entries become the dtype's most negative value, so they are
    never selected; --top-k rewrites the routing top-k. Every other tensor is byte-identical to
    the source, expert ids keep their numbers, and the config's expert count is unchanged. For
    families with a router bias (gpt-oss, DeepSeek-V3/GLM-4.5).
    """
    _plan_and_run(src, dst, plan_out, soft=True, kw=kw)


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] DST")
@click.option("--buffer-mib", type=int, default=16, show_default=True)
@click.option("--src-options", default=None, help="fsspec options for SRC as JSON.")
@click.option("--dst-options", default=None, help="fsspec options for DST as JSON.")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def verify(paths: tuple[str, ...], buffer_mib: int, src_options: str | None, dst_options: str | None,
           as_json: bool) -> None:
    """Prove DST: every byte of every output tensor equals its planned slice of SRC.

    SRC defaults to the source recorded in DST/pruning.json. Exits 1 on any mismatch.
    """
    if len(paths) > 2:
        raise click.UsageError("give [SRC] DST")
    src, dst = (None, paths[0]) if len(paths) == 1 else paths
    from planners.cost import human_bytes
    from rewriter.verify import verify as do_verify

    report = do_verify(src, dst, src_options=_json_opt(src_options), dst_options=_json_opt(dst_options),
                       buffer_bytes=buffer_mib * MiB)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
    else:
        click.echo(f"verified {report.tensors_checked} tensors, {human_bytes(report.bytes_checked)} of {report.dst} "
                   f"against {report.src}")
        for p in report.problems:
            click.echo(f"problem:  {p}")
        for m in report.mismatches[:20]:
            click.echo(f"mismatch: {m}")
        click.echo(f"mismatches: {len(report.mismatches)}, problems: {len(report.problems)} -> "
                   f"{'OK' if report.ok else 'FAILED'}")
    sys.exit(0 if report.ok else 1)


@main.command("dry-run")
@click.argument("src")
@click.option("--layer", "layer_ids", type=int, multiple=True, required=True, help="Layer to probe (repeat).")
@policy_options
@click.option("--scratch", default=None, help="Scratch directory (default: a temporary one).")
@click.option("--buffer-mib", type=int, default=16, show_default=True)
@click.option("--no-zero-copy", is_flag=True, help="Probe the buffered path instead of copy_file_range.")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def dry_run_cmd(src: str, layer_ids: tuple[int, ...], scratch: str | None, buffer_mib: int, no_zero_copy: bool,
                as_json: bool, **kw: Any) -> None:
    """Rewrite only the given layers' expert tensors and report time, bytes and peak RSS per layer."""
    from planners.cost import human_bytes, shard_label
    from rewriter.dryrun import dry_run

    p = make_plan(src, layers_only=list(layer_ids), **kw)
    probes = dry_run(p, scratch=scratch, buffer_bytes=buffer_mib * MiB, zero_copy=not no_zero_copy,
                     src_options=_json_opt(kw["storage_options"]))
    if as_json:
        click.echo(json.dumps([pr.to_json() for pr in probes], indent=1))
        return
    rows = [("layer", "source shards", "read", "written", "seconds", "MB/s", "copy s", "read s", "write s", "peak RSS")]
    for pr in probes:
        rows.append((str(pr.layer), ",".join(shard_label(s) for s in pr.source_shards), human_bytes(pr.bytes_read), human_bytes(pr.bytes_written),
                     f"{pr.seconds:.3f}", f"{pr.bytes_written / pr.seconds / 1e6:.0f}" if pr.seconds else "-",
                     f"{pr.copy_seconds:.3f}", f"{pr.read_seconds:.3f}", f"{pr.write_seconds:.3f}",
                     human_bytes(pr.peak_rss_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# --- saliency ------------------------------------------------------------------------------------

#: Options of the commands that run a model: device, dtype, streaming, memory cap, storage.
engine_options = _options(
    click.option("--device", default=None, help="cuda[:N] or cpu (default: cuda when available)."),
    click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
                 show_default=True, help="Compute dtype; auto: the checkpoint's own (MXFP4 experts: bfloat16)."),
    click.option("--streamed/--no-streamed", default=None,
                 help="Run one decoder layer at a time (default: when the model does not fit the device)."),
    click.option("--gpu-memory", type=float, default=None, metavar="GB",
                 help="Device memory to stay within (GiB); hidden states beyond it go to host memory."),
    click.option("--storage-options", default=None, help="fsspec options for MODEL as JSON (endpoint_url, key…)."),
)


def _engine_kwargs(device: str | None, dtype: str, gpu_memory: float | None, storage_options: str | None) -> dict[str, Any]:
    import torch

    if gpu_memory is not None and gpu_memory <= 0:
        raise click.BadParameter(f"{gpu_memory} is not a positive number of GiB", param_hint="--gpu-memory")
    return {"device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "dtype": None if dtype == "auto" else getattr(torch, dtype),
            "gpu_memory": None if gpu_memory is None else int(gpu_memory * (1 << 30)),
            "storage_options": _json_opt(storage_options)}


@main.command()
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True,
              help="Calibration file: .jsonl (text or input_ids), .npy ids, or plain text (repeat).")
@click.option("--out", required=True, help="Saliency file to write.")
@click.option("--domain", default="default", show_default=True, help="Name of this calibration domain.")
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--max-tokens", type=int, default=None, help="Stop after this many tokens.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Sequences per forward pass.")
@engine_options
@click.option("--quiet", is_flag=True)
@_fail_cleanly
def profile(model: str, data: tuple[str, ...], out: str, domain: str, seq_len: int, max_tokens: int | None,
            batch_size: int, device: str | None, dtype: str, streamed: bool | None, gpu_memory: float | None,
            storage_options: str | None, quiet: bool) -> None:
    """Measure each expert's saliency (freq, REAP, EAFT-REAP) of MODEL on calibration text.

    MODEL is a checkpoint of any supported MoE family (rewriter inspect lists them), in a local
    folder or at an fsspec URL (s3://, hf://…). A model that does not fit the device is run one
    decoder layer at a time (--streamed). Needs the torch extra (pip install '.[torch]').
    """
    from profiling.profile import profile as run_profile

    kw = _engine_kwargs(device, dtype, gpu_memory, storage_options)
    bar = TokenProgress(enabled=not quiet)
    try:
        sal = run_profile(model, list(data), domain=domain, seq_len=seq_len, max_tokens=max_tokens,
                          batch_size=batch_size, streamed=streamed, progress=bar, on_layer=bar.layer, **kw)
    finally:
        bar.close()
    sal.save(out)
    how = "streamed" if sal.method.get("streamed") else "whole model"
    click.echo(f"wrote {out}: domain {domain}, {sal.tokens:,} tokens, {len(sal.layers)} MoE layers, "
               f"{sal.method['seconds']:.1f} s ({sal.tokens / max(sal.method['seconds'], 1e-9):,.0f} tokens/s, "
               f"{how}, {sal.method['dtype']})")


class TokenProgress:
    """Tokens profiled, tokens/s."""

    def __init__(self, enabled: bool = True):
        import time

        self.enabled, self.done, self.t0, self.last = enabled, 0, time.monotonic(), 0.0

    def __call__(self, n: int) -> None:
        import time

        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last > 0.5:
            self.last = now
            click.echo(f"\rprofile {self.done:,} tokens, {self.done / max(now - self.t0, 1e-9):,.0f} tokens/s ",
                       err=True, nl=False)

    def layer(self, done: int, total: int) -> None:
        if self.enabled:
            click.echo(f"\rprofile: decoder layer {done}/{total} ", err=True, nl=False)

    def close(self) -> None:
        if self.enabled:
            click.echo("", err=True)


@main.command("eval")
@click.argument("model")
@click.option("--data", "packs", multiple=True, required=True, help="Evaluation pack (.jsonl/.npy/text; repeat).")
@click.option("--seq-len", "seq_lens", type=int, multiple=True, help="Block length (repeat; default 1024).")
@click.option("--blocks", type=int, default=16, show_default=True, help="Blocks per pack and sequence length.")
@click.option("--compare", default=None, help="Base model: report deltas and the near-lossless gates.")
@engine_options
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--gate-ppl-abs", type=float, default=0.25, show_default=True, help="Allowed perplexity rise (absolute).")
@click.option("--gate-ppl-rel", type=float, default=0.05, show_default=True, help="Allowed perplexity rise (share of base).")
@click.option("--gate-mean-p", type=float, default=0.02, show_default=True, help="Allowed |Δ mean reference probability|.")
@click.option("--gate-cc", type=float, default=0.002, show_default=True, help="Allowed |Δ confident-conflict rate|.")
@click.option("--gate-jsd", type=float, default=0.02, show_default=True, help="Allowed JSD of the (p, entropy) histograms.")
@click.option("--plot", default=None, help="Write a PNG of the (p, entropy) histograms here.")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def eval_cmd(model: str, packs: tuple[str, ...], seq_lens: tuple[int, ...], blocks: int, compare: str | None,
             device: str | None, dtype: str, streamed: bool | None, gpu_memory: float | None,
             storage_options: str | None, batch_size: int, gate_ppl_abs: float, gate_ppl_rel: float, gate_mean_p: float,
             gate_cc: float, gate_jsd: float, plot: str | None, as_json: bool) -> None:
    """Teacher-forced quality of MODEL per pack; with --compare, deltas and near-lossless gates.

    Exit status 1 when --compare is given and any gate fails (rule: docs/eval.md). Models that
    do not fit the device are run one decoder layer at a time (--streamed; docs/streaming.md).
    """
    from quality.evaluate import evaluate, format_table, plot_histograms
    from quality.gates import Gates

    gates = Gates(gate_ppl_abs, gate_ppl_rel, gate_mean_p, gate_cc, gate_jsd)
    result = evaluate(model, list(packs), seq_lens=seq_lens or (1024,), blocks=blocks, compare=compare,
                      gates=gates, batch_size=batch_size, streamed=streamed,
                      **_engine_kwargs(device, dtype, gpu_memory, storage_options))
    if plot:
        plot_histograms(result, plot)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        click.echo(format_table(result))
    sys.exit(1 if result["pass"] is False else 0)


@main.command("import-reap")
@click.argument("observer_file")
@click.option("--out", required=True, help="Saliency file to write.")
@click.option("--domain", default="reap-import", show_default=True)
@_fail_cleanly
def import_reap_cmd(observer_file: str, out: str, domain: str) -> None:
    """Convert a REAP observer file (torch.save dict) into a saliency file."""
    from profiling.reap_import import import_reap

    sal = import_reap(observer_file, domain)
    sal.save(out)
    click.echo(f"wrote {out}: {len(sal.layers)} layers from {observer_file}")


if __name__ == "__main__":
    main()
