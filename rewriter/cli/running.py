"""``run``, ``prune``, ``soft-prune`` and ``dry-run``: carrying out a plan, or probing layers of one."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import click

from core.errors import count
from rewriter.cli.errors import fail_cleanly as _fail_cleanly
from rewriter.cli.errors import on_interrupt
from rewriter.cli.group import main
from rewriter.cli.params import (
    BUFFER_MIB,
    JSON_OBJECT,
    NON_NEGATIVE,
    MiB,
    options_group,
    per_layer_plan_note,
    save_plan,
)
from rewriter.cli.planning import (
    keep_json,
    keep_summary,
    make_plan,
    policy_options,
    serving_options,
)
from rewriter.cli.runopts import options_from
from rewriter.cli.runopts import run_options as generated_run_options

if TYPE_CHECKING:
    from rewriter.exec.options import RunOptions

run_options = options_group(
    generated_run_options,
    click.option("--quiet", is_flag=True, help="No progress."),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
)


def _start_local_ray_quietly(address: str | None) -> None:
    """Start the local Ray instance a run without --address uses, without Ray's INFO lines (the
    executor then finds it started); a cluster at an address is joined at level ERROR already."""
    if address or os.environ.get("RAY_ADDRESS"):
        return
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)


def _execute(p: Any, dst: str, options: RunOptions, *, quiet: bool, as_json: bool) -> None:
    from planners.cost import human_bytes
    from rewriter.exec.dest import StatusWriter
    from rewriter.exec.run import execute
    from rewriter.tools.progress import ByteProgress

    bar = ByteProgress(enabled=not quiet and not as_json)
    status = StatusWriter()  # DST/.rewriter/status.json, what `rewriter status` reads

    def progress(n: int) -> None:
        bar(n)
        status(n)

    on_interrupt(f"the shards finished so far are kept in {dst}; run the same command again to resume")
    if options.ray:
        from rewriter.exec.distributed import execute_on_ray

        if quiet:
            _start_local_ray_quietly(options.address)
        result = execute_on_ray(p, dst, options, progress=progress, on_start=bar.start, observer=status)
    else:
        result = execute(p, dst, options, progress=progress, on_start=bar.start, observer=status)
    bar.close()
    if as_json:
        click.echo(json.dumps({**result.to_json(), **keep_json(p)}, indent=1))
        return
    if p.skipped_files:
        click.echo(f"left out {len(p.skipped_files)} source files ({', '.join(p.skipped_files[:3])}"
                   f"{', ...' if len(p.skipped_files) > 3 else ''}): other layouts of the same weights "
                   f"(original/, metal/) or hidden files, which would no longer match the pruned checkpoint")
    if result.already_complete:
        click.echo(f"{dst} already holds the complete output of this plan; nothing to do")
    else:
        resumed = sum(1 for s in result.shards if s.resumed)
        rate = result.bytes_written / result.seconds if result.seconds else 0
        click.echo(f"wrote {dst}: {count(len(result.shards), 'shard')} ({resumed} resumed), "
                   f"{human_bytes(result.bytes_written)} written, {human_bytes(result.bytes_read)} read, "
                   f"{result.seconds:.2f} s ({human_bytes(rate)}/s), peak RSS {human_bytes(result.peak_rss_bytes)}")
    if not p.loadable:
        counts = sorted({len(k) for k in p.keep.values()})
        click.echo(f"note: {dst} keeps {counts} experts in different layers; stock transformers cannot load "
                   f"it (its {p.family} model needs one count in every layer): use a loader that reads the per-layer "
                   f"counts its config.json holds in num_experts_per_layer, or plan with --keep-n/--keep-frac")


@main.command()
@click.argument("plan_file", metavar="PLAN")
@click.option("--out", "dst", required=True, help="Destination directory or URL.")
@click.option("--allow-nonuniform", is_flag=True, help="Execute a plan stock transformers cannot load.")
@click.option("--src-options", type=JSON_OBJECT, default=None, help="fsspec options for the source as JSON.")
@run_options
@_fail_cleanly
def run(plan_file: str, dst: str, allow_nonuniform: bool, src_options: dict[str, Any] | None, **kw: Any) -> None:
    """Execute PLAN into --out: stream the kept byte ranges, publish atomically, index last.

    Re-running the same command after an interruption resumes it.
    """
    from planners.plan import Plan

    p = Plan.load(plan_file)
    if p.is_dry_run:
        raise click.UsageError(per_layer_plan_note(plan_file))
    options = options_from(kw, allow_nonuniform=allow_nonuniform, src_options=src_options or {})
    _execute(p, dst, options, **kw)


prune_options = options_group(
    click.argument("src"),
    click.argument("dst"),
    policy_options,
    serving_options,
    click.option("--plan-out", default=None, help="Also save the plan here (replaces a plan file, never another file)."),
    click.option("--verbose", is_flag=True, help="Also list the kept expert ids of every layer."),
    run_options,
    _fail_cleanly,
)


@main.command()
@prune_options
def prune(src: str, dst: str, plan_out: str | None, verbose: bool, **kw: Any) -> None:
    """Plan and run in one command: prune SRC into DST.

    SRC is a safetensors checkpoint (a folder or its URL) or a GGUF model (its file, or any file of a split
    GGUF); DST is a folder, written in SRC's format.
    """
    _plan_and_run(src, dst, plan_out, verbose, soft=False, kw=kw)


def _plan_and_run(src: str, dst: str, plan_out: str | None, verbose: bool, soft: bool, kw: dict[str, Any]) -> None:
    # A soft prune keeps every expert, so its per-layer counts never make it unloadable.
    options = options_from(kw, allow_nonuniform=soft or kw["allow_nonuniform"], src_options=kw["storage_options"] or {})
    shown = {"quiet": kw.pop("quiet"), "as_json": kw.pop("as_json")}
    p, n_exp = make_plan(src, soft=soft, **kw)
    if plan_out:
        save_plan(p, plan_out, "--plan-out")
    if not shown["as_json"]:
        for line in keep_summary(p, n_exp, ids=verbose):
            click.echo(line)
    _execute(p, dst, options, **shown)


@main.command("soft-prune")
@prune_options
def soft_prune(src: str, dst: str, plan_out: str | None, verbose: bool, **kw: Any) -> None:
    """Try a keep set cheaply: copy SRC to DST with only router biases changed.

    Dropped experts' router bias entries become the dtype's most negative value, so they are
    never selected; --top-k rewrites the routing top-k. Every other tensor is byte-identical to
    the source, expert ids keep their numbers, and the config's expert count is unchanged. For
    families with a router bias (gpt-oss, DeepSeek-V3/GLM-4.5). SRC may be a GGUF model: there the
    bias llama.cpp adds before choosing is changed (gpt-oss ffn_gate_inp.bias, deepseek2/glm4moe
    exp_probs_b.bias) and the metadata's expert count is unchanged.
    """
    _plan_and_run(src, dst, plan_out, verbose, soft=True, kw=kw)


@main.command("dry-run")
@click.argument("src", metavar="SRC|PLAN")
@click.option("--layer", "layer_ids", type=NON_NEGATIVE, multiple=True,
              help="Layer to probe (repeat); required with SRC, not with a PLAN (its layers are probed).")
@policy_options
@click.option("--scratch", default=None, help="Scratch directory (default: a temporary one).")
@click.option("--buffer-mib", type=BUFFER_MIB, default=16, show_default=True, help="Copy buffer in MiB.")
@click.option("--no-zero-copy", is_flag=True, help="Probe the buffered path instead of copy_file_range.")
@click.option("--json", "as_json", is_flag=True, help="Print one record per layer as JSON.")
@_fail_cleanly
def dry_run_cmd(src: str, layer_ids: tuple[int, ...], scratch: str | None, buffer_mib: int, no_zero_copy: bool,
                as_json: bool, **kw: Any) -> None:
    """Rewrite only the given layers' expert tensors and report time, bytes and peak RSS per layer.

    SRC is a checkpoint, safetensors or GGUF (give --layer and the keep options); PLAN is a
    per-layer plan written by `rewriter plan SRC --layers N,... --out PLAN`, which holds both.
    """
    from planners.cost import human_bytes, shard_label
    from rewriter.exec.run import dry_run

    if "://" not in src and os.path.isfile(src) and not src.endswith((".safetensors", ".gguf")):
        p = _per_layer_plan(src, layer_ids, kw)
    elif not layer_ids:
        raise click.UsageError("give the layers to probe with --layer N (repeat), or a per-layer PLAN written "
                               "by `rewriter plan SRC --layers N,... --out PLAN`")
    else:
        p, _ = make_plan(src, layers_only=sorted(set(layer_ids)), layers_option="--layer", **kw)
    on_interrupt(f"the probe's scratch files are removed{f' from {scratch}' if scratch else ''}")
    probes = dry_run(p, scratch=scratch, buffer_bytes=buffer_mib * MiB, zero_copy=not no_zero_copy,
                     src_options=kw["storage_options"] or {})
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


def _per_layer_plan(plan_file: str, layer_ids: tuple[int, ...], kw: dict[str, Any]) -> Any:
    """The per-layer plan in ``plan_file``; keep options given beside it are refused (the plan holds its own)."""
    from planners.plan import Plan

    ctx = click.get_current_context()
    given = [f"--{k.replace('_', '-')}" for k in kw if k != "storage_options"
             and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    if layer_ids or given:
        raise click.UsageError(f"{plan_file} is a plan, which holds its layers and keep options: leave out "
                               f"{', '.join((['--layer'] if layer_ids else []) + given)}")
    p = Plan.load(plan_file)
    if not p.is_dry_run:
        raise click.UsageError(f"{plan_file} plans the whole checkpoint: run it with `rewriter run {plan_file} "
                               f"--out DST`, or give dry-run a plan written with --layers")
    return p
