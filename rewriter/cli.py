"""The ``rewriter`` command line. Heavy modules (torch, ray) are imported inside commands."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from rewriter.cli_errors import EXIT_FOUND, EXIT_OK, EXIT_STATUS_HELP, RewriterGroup, on_interrupt
from rewriter.cli_errors import fail_cleanly as _fail_cleanly
from rewriter.cli_params import (
    DOMAIN,
    JSON_OBJECT,
    NON_NEGATIVE,
    POSITIVE,
    SIZE,
    finite,
    per_layer_plan_note,
    refuse_existing_file,
    refuse_missing_folder,
    save_plan,
    save_saliency,
)
from rewriter.core.errors import count

MiB = 1 << 20
log = logging.getLogger(__name__)
#: Largest --buffer-mib: far past where copies get faster, and every worker allocates one.
MAX_BUFFER_MIB = 1024
#: Bounds of the estimate's bandwidths (MB/s) and latency (ms): past them it says nothing useful.
MIN_MBPS, MAX_MBPS, MAX_LATENCY_MS = 0.001, 1e7, 60000.0


class _BufferMiB(click.ParamType):
    name = "MIB"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        n: int = click.INT.convert(value, param, ctx)
        if n < 1:
            self.fail(f"{n} is not a positive number of MiB; give 1-{MAX_BUFFER_MIB} (16-256 is usual)", param, ctx)
        if n > MAX_BUFFER_MIB:
            self.fail(f"{n} MiB is more than the {MAX_BUFFER_MIB} MiB allowed: each worker allocates this much "
                      f"and copies are no faster past a few tens of MiB; give 1-{MAX_BUFFER_MIB} (16-256 is usual)", param, ctx)
        return n


BUFFER_MIB = _BufferMiB()


class _PartMiB(click.ParamType):
    """--part-mib: the multipart-upload pieces are min(part, 64 MiB), at least 5 MiB, and a part
    is a whole number of them."""

    name = "MIB"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        n: int = click.INT.convert(value, param, ctx)
        if n < 5 or (n > 64 and n % 64):
            self.fail(f"{n} MiB is not a part size: give 5 to 64, or a multiple of 64 (128, 192, 256, ...)",
                      param, ctx)
        return n


class _LinkMbps(click.FloatRange):
    """--link-mbps: 0 (no cap) or a bandwidth in MIN_MBPS..MAX_MBPS."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        v = finite(0, MAX_MBPS).convert(value, param, ctx)
        if 0 < v < MIN_MBPS:
            self.fail(f"{value!r} MB/s is below {MIN_MBPS}: give 0 (no cap) or {MIN_MBPS}-{MAX_MBPS:g}", param, ctx)
        return v


PART_MIB, LINK_MBPS = _PartMiB(), _LinkMbps(0, MAX_MBPS)


@click.group(cls=RewriterGroup, epilog=EXIT_STATUS_HELP)
@click.version_option(package_name="moe-rewriter")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Prune experts out of Mixture-of-Experts checkpoints by streaming byte ranges.

    Typical flow: `rewriter inspect SRC`, `rewriter plan SRC --saliency S.json --keep-frac 0.5
    --out plan.json` (prints the I/O cost), `rewriter run plan.json --out DST`, then
    `rewriter verify SRC DST`. `rewriter prune SRC DST ...` plans and runs in one go.
    """
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: an embedding program's logging setup wins
        handler = logging.StreamHandler()
        handler.setFormatter(_LogFormat())
        root.addHandler(handler)
        root.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)])


class _LogFormat(logging.Formatter):
    """Warnings as the CLI's own ``warning: ...`` lines; info and debug (-v, -vv) name their module."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {record.getMessage()}"
        return super().format(record)


# --- synth / inspect ---------------------------------------------------------------------------

@main.command()
@click.option("--preset", required=True, help="Geometry: 20b, 120b, tiny, tiny-bf16, small.")
@click.option("--layers", type=POSITIVE, default=None, help="Keep the preset's per-layer geometry with N layers.")
@click.option("--sparse", is_flag=True, help="Real headers over holes: full geometry at no disk cost.")
@click.option("--computing", is_flag=True,
              help="Weights that compute (finite, unit-scale activations): for profile and eval runs.")
@click.option("--force", is_flag=True, help="Write into OUT even when it is not empty (same-named files are replaced).")
@click.option("--quiet", is_flag=True, help="No progress.")
@click.argument("out", type=click.Path(file_okay=False))
@_fail_cleanly
def synth(preset: str, layers: int | None, sparse: bool, computing: bool, force: bool, quiet: bool, out: str) -> None:
    """Write a synthetic gpt-oss checkpoint to OUT (a new or empty folder)."""
    from rewriter.core.format import nbytes_of
    from rewriter.progress import ByteProgress
    from rewriter.synth import (
        all_tensors,
        computing_chunks,
        holds_only_temporaries,
        write_checkpoint,
    )
    from rewriter.synth import preset as get_preset

    try:
        g = get_preset(preset, layers)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--preset") from None
    if computing and sparse:
        raise click.BadParameter("a sparse checkpoint has no weights to compute with", param_hint="--computing")
    if os.path.isdir(out) and not holds_only_temporaries(out) and not force:
        raise click.BadParameter(f"{out} is not empty; refusing to mix two checkpoints in one folder: choose "
                                 f"a new folder or pass --force to write into it anyway", param_hint="OUT")
    on_interrupt(lambda: f"{out} holds no finished file yet; run the same command again"
                 if not os.path.isdir(out) or holds_only_temporaries(out)
                 else f"{out} holds a partial checkpoint; run the same command with --force to write it again")
    bar = ByteProgress(label="synth", enabled=not quiet and not sparse)
    bar.start(sum(nbytes_of(d, shape) for _, d, shape in all_tensors(g)))
    index = write_checkpoint(out, g, sparse=sparse, progress=bar, values=computing_chunks if computing else None)
    bar.close()
    shards = len(set(index["weight_map"].values()))
    click.echo(f"wrote {out}: {g.num_layers} layers x {g.num_experts} experts, {count(shards, 'shard')}, "
               f"total_size {index['metadata']['total_size']:,}{' (sparse)' if sparse else ''}")


@main.command("synth-saliency")
@click.argument("ckpt")
@click.option("--out", required=True, help="Saliency file to write (an existing file needs --force).")
@click.option("--domain", type=DOMAIN, default="synthetic", show_default=True,
              help="Calibration domain name recorded in the file (what --weight DOMAIN=W refers to).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the scores.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@_fail_cleanly
def synth_saliency(ckpt: str, out: str, domain: str, seed: int, force: bool) -> None:
    """Write plausible random saliency for CKPT (for trying the planner without a GPU)."""
    from planners.saliency import model_identity
    from rewriter.core.checkpoint import Checkpoint
    from rewriter.synth import synthetic_saliency

    refuse_existing_file(out, "--out", force)
    c = Checkpoint.open(ckpt)
    identity = model_identity(c)
    s = synthetic_saliency(identity["num_layers"], identity["num_experts"], identity["top_k"], domain, seed,
                           model=identity)
    # Scores are generated for layers 0..n-1; key them by the checkpoint's MoE layer numbers.
    moe = sorted(c.layout.moe_layers(c))
    s = dataclasses.replace(s, layers={layer: s.layers[i] for i, layer in enumerate(moe)})
    save_saliency(s, out, force)
    click.echo(f"wrote {out}: domain {domain}, {len(s.layers)} layers, family {identity['family']}")


@main.command()
@click.argument("ckpt")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--storage-options", type=JSON_OBJECT, default=None, help="fsspec options as JSON (endpoint_url, key…).")
@_fail_cleanly
def inspect(ckpt: str, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Describe checkpoint CKPT from its headers alone: family, experts, bytes, shard locality.

    CKPT is a safetensors checkpoint (a folder or its URL) or a GGUF model (its file, or any file of a split
    GGUF).
    """
    from rewriter.inspect import describe, format_description

    info = describe(ckpt, storage_options or {})
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
        click.option("--keep-frac", type=finite(), default=None, help="Share of experts kept per layer, in (0, 1]."),
        click.option("--keep-n", type=POSITIVE, default=None, help="Experts kept per layer."),
        click.option("--keep-multiple", type=POSITIVE, default=1, show_default=True,
                     help="Round the kept count up to a multiple of M."),
        click.option("--core-top-m", type=NON_NEGATIVE, default=0, show_default=True,
                     help="Always keep each layer's M highest-ranked experts."),
        click.option("--coverage", type=finite(0, 1, min_open=True), default=0.9, show_default=True,
                     help="Share of each domain's saliency mass its experts must cover (union), in (0, 1]."),
        click.option("--top-k", type=POSITIVE, default=None, help="New routing top-k (default: unchanged)."),
        click.option("--budget", type=POSITIVE, default=None,
                     help="Total experts over all layers: a non-uniform plan (not loadable by stock transformers)."),
        click.option("--keep-outliers", type=finite(min=0), default=None, metavar="Z",
                     help="Always keep experts whose maximum activation norm has a z-score above Z in their layer."),
        click.option("--renormalize-topk", is_flag=True,
                     help="Set norm_topk_prob in the output config: kept experts' routing weights sum to 1 "
                          "(Qwen2/3-MoE, OLMoE, DeepSeek-V3)."),
        click.option("--allow-nonuniform", is_flag=True, help="Accept plans with different counts per layer."),
        click.option("--allow-foreign-saliency", is_flag=True,
                     help="Use saliency recorded for another model (family, geometry or tensors differ)."),
        click.option("--max-shard-size", type=SIZE, default="5GB", show_default=True,
                     help="Output shard size limit, like 5GB or 500MiB."),
    click.option("--storage-options", type=JSON_OBJECT, default=None, help="fsspec options for SRC as JSON."),
)


serving_options = _options(
    click.option("--target", "targets", multiple=True,
                 type=click.Choice(["vllm", "sglang", "trtllm", "llamacpp", "transformers"]),
                 help="Serving engine the output must load in (repeat); the plan refuses otherwise (docs/serving.md)."),
    click.option("--ep", type=click.IntRange(min=1), default=None, help="Expert-parallel size the output will be served with."),
    click.option("--fit-targets", is_flag=True, help="Move the kept count to the nearest one every --target accepts."),
)


def _parse_layers(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated layer numbers like 0,5,17",
                                 param_hint=option) from None
    if not layers:
        raise click.BadParameter("no layer given", param_hint=option)
    return sorted(set(layers))


def _weights(texts: tuple[str, ...]) -> dict[str, float]:
    weights = {}
    for w in texts:
        name, _, val = w.partition("=")
        try:
            weights[name] = float(val)
        except ValueError:
            raise click.BadParameter(f"{w!r}: expected DOMAIN=WEIGHT", param_hint="--weight") from None
    return weights


def make_plan(src: str, *, layers_only: list[int] | None = None, layers_option: str = "--layers",
              soft: bool = False, **kw: Any) -> tuple[Any, int]:
    """Plan SRC from the command's policy options (:func:`planners.plan_prune`).

    Returns:
        The plan and the source's experts per layer.
    """
    from planners import PlanOptions, plan_prune
    from planners.policies import KeepPolicy
    from rewriter.core.errors import OptionError

    options = PlanOptions(
        # A keep list takes no weights (nor checks them).
        saliency=tuple(kw["saliency"]), weights={} if kw["keep_list"] else _weights(kw["weights"]),
        keep_list=kw["keep_list"],
        policy=KeepPolicy(rank=kw["rank"], keep_n=kw["keep_n"], keep_frac=kw["keep_frac"],
                          keep_multiple=kw["keep_multiple"], core_top_m=kw["core_top_m"], coverage=kw["coverage"],
                          top_k=kw["top_k"], budget=kw["budget"], keep_outliers=kw["keep_outliers"]),
        renormalize_topk=kw["renormalize_topk"],
        allow_nonuniform=kw["allow_nonuniform"], allow_foreign_saliency=kw["allow_foreign_saliency"],
        max_shard_bytes=kw["max_shard_size"], storage_options=kw.get("storage_options") or {},
        targets=tuple(kw.get("targets") or ()), ep=kw.get("ep"), fit_targets=bool(kw.get("fit_targets")),
        layers_only=tuple(layers_only) if layers_only is not None else None, soft=soft,
    )
    try:
        plan = plan_prune(src, options, notify=lambda note: click.echo(note, err=True))
    except OptionError as e:
        flag = {"layers_only": layers_option, "weights": "--weight"}.get(e.option or "")
        if flag:
            raise click.BadParameter(str(e), param_hint=flag) from None
        raise click.UsageError(str(e)) from None
    return plan, int(plan.provenance["source_experts_per_layer"])


def keep_summary(p: Any, num_experts: int, ids: bool = False) -> list[str]:
    """What a plan keeps: counts per layer (one line when uniform), the kept ids when ``ids``."""
    counts = {layer: len(k) for layer, k in sorted(p.keep.items())}
    if not counts:
        return []
    layers = list(counts)
    if len(set(counts.values())) == 1:
        lines = [f"kept:       {counts[layers[0]]} of {num_experts} experts in each of {len(layers)} MoE "
                 f"layers ({layers[0]}..{layers[-1]}), routing top-k {p.top_k}"]
    else:
        lines = [f"kept:       of {num_experts} experts per layer: "
                 + ", ".join(f"layer {layer}: {n}" for layer, n in counts.items()) + f"; routing top-k {p.top_k}"]
    if ids:
        lines += [f"  layer {layer}: {list(k)}" for layer, k in sorted(p.keep.items())]
    if not p.soft and all(n == num_experts for n in counts.values()):
        lines.append("note:       every expert is kept: the output is a full copy of the source "
                     "(re-sharded to --max-shard-size)")
    return lines


cost_options = _options(
        click.option("--workers", type=POSITIVE, default=1, show_default=True, help="Workers for the time estimate."),
        click.option("--read-mbps", type=finite(MIN_MBPS, MAX_MBPS), default=None,
                     help=f"Per-worker read bandwidth, MB/s, {MIN_MBPS}-{MAX_MBPS:g} (default 1000)."),
        click.option("--write-mbps", type=finite(MIN_MBPS, MAX_MBPS), default=None,
                     help=f"Per-worker write bandwidth, MB/s, {MIN_MBPS}-{MAX_MBPS:g} (default 1000)."),
        click.option("--latency-ms", type=finite(0, MAX_LATENCY_MS), default=0, show_default=True,
                     help="Time to the first byte of each read request, ms (object stores: tens of ms)."),
        click.option("--inflight", type=click.IntRange(min=0, max=4096), default=None,
                     help="Read requests in flight per worker for the estimate, each at --read-mbps (0: one at "
                          "a time, then the writes). Default: what a run keeps by default, 16 "
                          "(--max-inflight-requests), for a remote source; 0 for a local one."),
        click.option("--max-gap-kib", type=click.IntRange(min=0, max=1 << 20), default=64, show_default=True,
                     help="Ranges of a remote source shard at most this far apart are read as one request "
                          "(a local source is read range by range)."),
        click.option("--link-mbps", type=LINK_MBPS, default=0,
                     help=f"All of a worker's read requests together at most this fast, MB/s, {MIN_MBPS}-"
                          f"{MAX_MBPS:g} (the network card, or what the store serves one client; 0, the "
                          f"default: no cap)."),
    click.option("--measure-bandwidth", type=click.Path(exists=True, file_okay=False), default=None, metavar="DIR",
                 help="Measure read/write bandwidth of the disk holding DIR first (writes 256 MiB there)."),
)


@main.command()
@click.argument("src")
@policy_options
@serving_options
@cost_options
@click.option("--layers", default=None, help="Comma-separated layers: a per-layer dry-run plan of their expert tensors.")
@click.option("--buffer-mib", type=BUFFER_MIB, default=16, show_default=True, help="Executor buffer (for request counts).")
@click.option("--out", "out", default=None,
              help="Write the plan JSON here (replaces an existing plan file, never another file).")
@click.option("--json", "as_json", is_flag=True, help="Print the cost report, keep sets and mapping as JSON.")
@click.option("--verbose", is_flag=True, help="Also list the kept expert ids of every layer.")
@_fail_cleanly
def plan(src: str, layers: str | None, buffer_mib: int, out: str | None, as_json: bool, verbose: bool,
         workers: int, read_mbps: float | None, write_mbps: float | None, measure_bandwidth: str | None,
         latency_ms: float, inflight: int | None, max_gap_kib: int, link_mbps: float, **kw: Any) -> None:
    """Plan the pruning of SRC and print its I/O cost and what it keeps (nothing is written but --out).

    SRC is a safetensors checkpoint (a folder or its URL) or a GGUF model (its file, or any file of a split
    GGUF); the plan's outputs are of the same format.
    """
    from planners.cost import estimate, format_report
    from rewriter.core.storage import is_local_url
    from rewriter.exec.copy import IOOptions

    p, n_exp = make_plan(src, layers_only=_parse_layers(layers, "--layers"), **kw)
    if out:
        save_plan(p, out, "--out")
    read_bw, write_bw = _bandwidths(read_mbps, write_mbps, measure_bandwidth)
    if inflight is None:
        inflight = 0 if is_local_url(p.source_url) else IOOptions().inflight_requests
    report = estimate(p, workers=workers, read_bytes_per_s=read_bw, write_bytes_per_s=write_bw,
                      buffer_bytes=buffer_mib * MiB, latency_s=latency_ms / 1000, inflight=inflight,
                      max_gap=max_gap_kib * 1024, link_bytes_per_s=link_mbps * 1e6)
    if as_json:
        click.echo(json.dumps({"plan": out, "plan_digest": p.digest, "num_experts": n_exp, **_keep_json(p),
                               "cost": report.to_json()}, indent=1))
        return
    click.echo(format_report(report))
    for line in keep_summary(p, n_exp, ids=verbose):
        click.echo(line)
    if out:
        click.echo(f"plan:       {out} ({p.digest[:12]})")


def _keep_json(p: Any) -> dict[str, Any]:
    """What a plan keeps, for ``--json``: top-k, kept ids and old -> new expert ids per layer."""
    return {"top_k": p.top_k, "keep": {str(k): list(v) for k, v in sorted(p.keep.items())},
            "expert_mapping": p.expert_mapping(), "loadable_by_transformers": p.loadable}


def _bandwidths(read_mbps: float | None, write_mbps: float | None, measure_dir: str | None) -> tuple[float, float]:
    read_bw, write_bw = 1e9, 1e9
    if measure_dir:
        from rewriter.exec.probe import measure_disk

        read_bw, write_bw = measure_disk(measure_dir)
    if read_mbps:
        read_bw = read_mbps * 1e6
    if write_mbps:
        write_bw = write_mbps * 1e6
    return read_bw, write_bw


@main.command()
@click.argument("saliency_a", metavar="SAL_A")
@click.argument("saliency_b", metavar="SAL_B")
@click.option("--rank", type=click.Choice(["freq", "reap", "eaft_reap"]), default="reap", show_default=True,
              help="Saliency metric to rank experts by.")
@click.option("--keep-frac", type=finite(), default=None, help="Share of experts kept per layer, in (0, 1].")
@click.option("--keep-n", type=POSITIVE, default=None, help="Experts kept per layer.")
@click.option("--core-top-m", type=NON_NEGATIVE, default=0, show_default=True,
              help="Always keep each layer's M highest-ranked experts.")
@click.option("--keep-outliers", type=finite(min=0), default=None, metavar="Z",
              help="Always keep experts whose maximum activation norm has a z-score above Z.")
@click.option("--top-k", type=POSITIVE, default=None, help="The model's routing top-k (default: recorded in SAL_A).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer overlaps and the summary as JSON.")
@_fail_cleanly
def stability(saliency_a: str, saliency_b: str, rank: str, keep_frac: float | None, keep_n: int | None,
              core_top_m: int, keep_outliers: float | None, top_k: int | None, as_json: bool) -> None:
    """Would two calibration samples keep the same experts? Per-layer Jaccard overlap of the keep
    sets one policy chooses from SAL_A and from SAL_B (two profiles of one model, e.g. on disjoint
    halves of the calibration data). Low overlap: the calibration data does not yet decide which
    experts matter."""
    from planners.policies import KeepPolicy
    from planners.saliency import load_saliency
    from planners.stability import format_stability
    from planners.stability import stability as compare

    policy = KeepPolicy(rank=rank, keep_n=keep_n, keep_frac=keep_frac, core_top_m=core_top_m,
                        keep_outliers=keep_outliers)
    report = compare(load_saliency(saliency_a), load_saliency(saliency_b), policy, top_k)
    click.echo(json.dumps(report, indent=1) if as_json else format_stability(report))


# --- execution ----------------------------------------------------------------------------------

run_options = _options(
        click.option("--buffer-mib", type=BUFFER_MIB, default=16, show_default=True,
                     help="Copy buffer in MiB; bounds the data path's memory."),
        click.option("--force", is_flag=True, help="Overwrite a destination holding other output."),
        click.option("--no-zero-copy", is_flag=True, help="Never use copy_file_range (always buffered)."),
        click.option("--max-inflight-mib", type=click.IntRange(min=0, max=1 << 20), default=256, show_default=True,
                     help="Bytes requested and not yet written per shard, in MiB (bounds memory); "
                          "0: one request at a time."),
        click.option("--max-inflight-requests", type=click.IntRange(min=1, max=1024), default=16, show_default=True,
                     help="Read requests in flight per shard (remote sources)."),
        click.option("--max-gap-kib", type=click.IntRange(min=0, max=1 << 20), default=64, show_default=True,
                     help="Remote ranges of a source shard at most this far apart are read as one request."),
        click.option("--jobs", type=click.IntRange(min=1, max=256), default=None,
                     help="Output shards written at once by a run here (default: up to 4 for a local "
                          "source and destination, bounded by the cores and shards; 1 otherwise)."),
        click.option("--drop-cache", is_flag=True, help="Drop written pages from the page cache."),
        click.option("--dst-options", type=JSON_OBJECT, default=None, help="fsspec options for DST as JSON."),
        click.option("--ray", "use_ray", is_flag=True, help="Run on Ray CPU actors (pip install '.[ray]')."),
        click.option("--address", default=None, help="Ray cluster address (default: start a local one)."),
        click.option("--workers", "ray_workers", type=POSITIVE, default=2, show_default=True, help="Ray actors."),
        click.option("--ray-timeout", type=finite(0, 86400, min_open=True), default=30,
                     show_default=True, help="Seconds to wait for the Ray cluster at --address to answer."),
        click.option("--ray-pending-timeout", type=finite(0, 86400, min_open=True), default=600,
                     show_default=True, help="Seconds to wait for a Ray actor the cluster cannot place (no free "
                     "CPU or memory, a lost node) or is restarting before its work goes to the others, or the run "
                     "stops if none runs."),
        click.option("--part-mib", type=PART_MIB, default=1024, show_default=True,
                     help="With --ray: shards larger than this are written in parts of this size by several "
                     "actors and resumed part by part (5 to 64, or a multiple of 64 above 64: the parts "
                     "are uploaded in pieces of at most 64 MiB)."),
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


def _execute(p: Any, dst: str, *, buffer_mib: int, force: bool, no_zero_copy: bool, drop_cache: bool,
             dst_options: dict[str, Any] | None, use_ray: bool, address: str | None, ray_workers: int, ray_timeout: float,
             ray_pending_timeout: float, part_mib: int, quiet: bool,
             as_json: bool, allow_nonuniform: bool, src_options: dict[str, Any] | None, max_inflight_mib: int,
             max_inflight_requests: int, max_gap_kib: int, jobs: int | None) -> None:
    from planners.cost import human_bytes
    from rewriter.exec.copy import IOOptions
    from rewriter.exec.executor import execute
    from rewriter.exec.runstatus import StatusWriter
    from rewriter.progress import ByteProgress

    bar = ByteProgress(enabled=not quiet and not as_json)
    status = StatusWriter()  # DST/.rewriter/status.json, what `rewriter status` reads

    def progress(n: int) -> None:
        bar(n)
        status(n)

    kwargs: dict[str, Any] = dict(
        src_options=src_options or {}, dst_options=dst_options or {}, buffer_bytes=buffer_mib * MiB,
        progress=progress, force=force, allow_nonuniform=allow_nonuniform, zero_copy=not no_zero_copy,
        drop_cache=drop_cache, on_start=bar.start, observer=status,
        io=IOOptions(inflight_bytes=max_inflight_mib * MiB, inflight_requests=max_inflight_requests,
                     max_gap=max_gap_kib * 1024, jobs=jobs),
    )
    on_interrupt(f"the shards finished so far are kept in {dst}; run the same command again to resume")
    if use_ray:
        from rewriter.exec.ray_executor import execute_on_ray

        if quiet:
            _start_local_ray_quietly(address)
        result = execute_on_ray(p, dst, address=address, workers=ray_workers, connect_timeout_s=ray_timeout,
                                pending_timeout_s=ray_pending_timeout, part_bytes=part_mib * MiB, **kwargs)
    else:
        result = execute(p, dst, **kwargs)
    bar.close()
    if as_json:
        click.echo(json.dumps({**result.to_json(), **_keep_json(p)}, indent=1))
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
    _execute(p, dst, allow_nonuniform=allow_nonuniform, src_options=src_options, **kw)


prune_options = _options(
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
    run_keys = ("buffer_mib", "force", "no_zero_copy", "drop_cache", "dst_options", "use_ray", "address",
                "ray_workers", "ray_timeout", "ray_pending_timeout", "part_mib", "quiet", "as_json",
                "max_inflight_mib", "max_inflight_requests", "max_gap_kib", "jobs")
    run_kw = {k: kw.pop(k) for k in run_keys}
    p, n_exp = make_plan(src, soft=soft, **kw)
    if plan_out:
        save_plan(p, plan_out, "--plan-out")
    if not run_kw["as_json"]:
        for line in keep_summary(p, n_exp, ids=verbose):
            click.echo(line)
    # A soft prune keeps every expert, so its per-layer counts never make it unloadable.
    _execute(p, dst, allow_nonuniform=soft or kw["allow_nonuniform"], src_options=kw["storage_options"], **run_kw)


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


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] DST")
@click.option("--buffer-mib", type=BUFFER_MIB, default=16, show_default=True, help="Read buffer in MiB per side.")
@click.option("--src-options", type=JSON_OBJECT, default=None, help="fsspec options for SRC as JSON.")
@click.option("--dst-options", type=JSON_OBJECT, default=None, help="fsspec options for DST as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (tensors, bytes, mismatches, problems) as JSON.")
@click.option("--quiet", is_flag=True, help="No progress on stderr (a bar on a terminal, a line every few seconds otherwise).")
@click.option("--ray", "use_ray", is_flag=True, help="Check the shards in Ray tasks (pip install '.[ray]').")
@click.option("--address", default=None, help="Ray cluster address, with --ray (default: start a local one).")
@click.option("--workers", "ray_workers", type=POSITIVE, default=2, show_default=True, help="Ray tasks at a time, with --ray.")
@click.option("--ray-timeout", type=finite(0, 86400, min_open=True), default=30, show_default=True,
              help="With --ray: seconds to wait for the Ray cluster at --address to answer.")
@_fail_cleanly
def verify(paths: tuple[str, ...], buffer_mib: int, src_options: dict[str, Any] | None,
           dst_options: dict[str, Any] | None, as_json: bool, quiet: bool, use_ray: bool, address: str | None,
           ray_workers: int, ray_timeout: float) -> None:
    """Prove DST: every byte of every output tensor equals its planned slice of SRC, and every
    shard hashes to the sha256 (of the shard, or of each part) DST/pruning.json records.

    SRC defaults to the source recorded in DST/pruning.json: a remote source's URL; a local source
    is recorded by content only (no path of this machine is published), so give SRC. Exits 1 when it finds a mismatch or
    a problem, 2 when it cannot verify (DST is not an output of this tool, SRC cannot be read).
    SRC may be a GGUF model (its file, or any file of a split GGUF); DST is then a GGUF output.
    """
    if len(paths) > 2:
        raise click.UsageError("give [SRC] DST")
    src, dst = (None, paths[0]) if len(paths) == 1 else paths
    _refuse_file_as_output(dst, "DST")
    from planners.cost import human_bytes
    from rewriter.exec.verify import verify as do_verify

    if use_ray:
        from rewriter.exec.ray_verify import verify_on_ray

        report = verify_on_ray(src, dst, address=address, workers=ray_workers, src_options=src_options or {},
                               dst_options=dst_options or {}, buffer_bytes=buffer_mib * MiB,
                               connect_timeout_s=ray_timeout)
    else:
        from rewriter.progress import ByteProgress

        bar = ByteProgress(label="verify", enabled=not quiet and not as_json)

        def progress(n: int, total: int) -> None:
            if not bar.total:
                bar.start(total)
            bar(n)

        report = do_verify(src, dst, src_options=src_options or {}, dst_options=dst_options or {},
                           buffer_bytes=buffer_mib * MiB, progress=progress)
        bar.close(completed=report.ok)
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
    sys.exit(EXIT_OK if report.ok else EXIT_FOUND)


def _refuse_file_as_output(path: str, param: str) -> None:
    """An output of `run` is a folder: a local file given for one is named as such."""
    if "://" not in path and os.path.isfile(path):
        raise click.BadParameter(f"{path} is a file; give the folder `rewriter run`/`prune` wrote (it holds "
                                 f"pruning.json and the index)", param_hint=param)


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
    from rewriter.exec.dryrun import dry_run

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


# --- saliency ------------------------------------------------------------------------------------

#: Options of the commands that run a model: device, dtype, streaming, memory cap, storage.
engine_options = _options(
    click.option("--device", default=None, help="cuda[:N] or cpu (default: cuda when available)."),
    click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
                 show_default=True, help="Compute dtype; auto: the checkpoint's own (MXFP4 experts: bfloat16)."),
    click.option("--streamed/--no-streamed", default=None,
                 help="Run one decoder layer at a time (default: when the model does not fit the device)."),
    click.option("--gpu-memory", type=finite(), default=None, metavar="GB",
                 help="Device memory to stay within (GiB); hidden states beyond it go to host memory."),
    click.option("--storage-options", type=JSON_OBJECT, default=None,
                 help="fsspec options for MODEL as JSON (endpoint_url, key…)."),
)


def _engine_kwargs(device: str | None, dtype: str, gpu_memory: float | None,
                   storage_options: dict[str, Any] | None) -> dict[str, Any]:
    import torch

    if gpu_memory is not None and not 0 < gpu_memory <= 1 << 20:
        raise click.BadParameter(f"{gpu_memory} is not a number of GiB between 0 and {1 << 20:,}",
                                 param_hint="--gpu-memory")
    return {"device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "dtype": None if dtype == "auto" else getattr(torch, dtype),
            "gpu_memory": None if gpu_memory is None else int(gpu_memory * (1 << 30)),
            "storage_options": storage_options or {}}


@main.command()
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True,
              help="Calibration file: .jsonl (text or input_ids), .npy ids, or plain text (repeat).")
@click.option("--out", required=True, help="Saliency file to write.")
@click.option("--domain", type=DOMAIN, default="default", show_default=True, help="Name of this calibration domain.")
@click.option("--seq-len", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Tokens per packed sequence (at least 2: a token and the next one it predicts).")
@click.option("--max-tokens", type=POSITIVE, default=None, help="Stop after this many tokens.")
@click.option("--batch-size", type=POSITIVE, default=1, show_default=True, help="Sequences per forward pass.")
@engine_options
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress.")
@_fail_cleanly
def profile(model: str, data: tuple[str, ...], out: str, domain: str, seq_len: int, max_tokens: int | None,
            batch_size: int, device: str | None, dtype: str, streamed: bool | None, gpu_memory: float | None,
            storage_options: dict[str, Any] | None, force: bool, quiet: bool) -> None:
    """Measure each expert's saliency (freq, REAP, EAFT-REAP) of MODEL on calibration text.

    MODEL is a checkpoint of any supported MoE family (rewriter inspect lists them), in a local
    folder or at an fsspec URL (s3://, hf://…). A model that does not fit the device is run one
    decoder layer at a time (--streamed). Needs the torch extra (pip install '.[torch]').
    """
    from profiling.profile import profile as run_profile

    kw = _engine_kwargs(device, dtype, gpu_memory, storage_options)
    refuse_existing_file(out, "--out", force)  # before the profile, not after hours of it
    refuse_missing_folder(out, "--out")
    bar = TokenProgress(enabled=not quiet)
    try:
        sal = run_profile(model, list(data), domain=domain, seq_len=seq_len, max_tokens=max_tokens,
                          batch_size=batch_size, streamed=streamed, progress=bar, on_layer=bar.layer, **kw)
    finally:
        bar.close()
    save_saliency(sal, out, force)
    how = "streamed" if sal.method.get("streamed") else "whole model"
    click.echo(f"wrote {out}: domain {domain}, {sal.tokens:,} tokens, {len(sal.layers)} MoE layers, "
               f"{sal.method['seconds']:.1f} s ({sal.tokens / max(sal.method['seconds'], 1e-9):,.0f} tokens/s, "
               f"{how}, {sal.method['dtype']})")


class TokenProgress:
    """Tokens profiled and tokens/s on stderr: redrawn in place on a terminal, otherwise a plain
    line every few seconds (as :class:`rewriter.progress.ByteProgress` does for bytes)."""

    def __init__(self, enabled: bool = True, log_every: float = 5.0):
        from rewriter.exec.throttle import Throttle
        from rewriter.progress import is_terminal

        self.enabled, self.done, self.t0 = enabled, 0, time.monotonic()
        self.tty = is_terminal(sys.stderr)
        self.throttle = Throttle(0.5 if self.tty else log_every)
        self.drawn = False

    def _say(self, text: str) -> None:
        click.echo(f"\r{text} " if self.tty else text, err=True, nl=not self.tty)
        self.drawn = True

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and self.throttle.due(now):
            self._say(f"profile: {self.done:,} tokens, {self.done / max(now - self.t0, 1e-9):,.0f} tokens/s")

    def layer(self, done: int, total: int) -> None:
        if self.enabled:
            self._say(f"profile: decoder layer {done}/{total}")

    def close(self) -> None:
        """The final count (throttled lines may have stopped short of it)."""
        if self.enabled and self.done:
            self._say(f"profile: {self.done:,} tokens, "
                      f"{self.done / max(time.monotonic() - self.t0, 1e-9):,.0f} tokens/s")
        if self.enabled and self.tty and self.drawn:
            click.echo("", err=True)


@main.command("eval")
@click.argument("model")
@click.option("--data", "packs", multiple=True, required=True, help="Evaluation pack (.jsonl/.npy/text; repeat).")
@click.option("--seq-len", "seq_lens", type=click.IntRange(min=2), multiple=True,
              help="Block length, at least 2 (repeat; default 1024).")
@click.option("--blocks", type=POSITIVE, default=16, show_default=True, help="Blocks per pack and sequence length.")
@click.option("--compare", default=None, help="Base model: report deltas and the near-lossless gates.")
@engine_options
@click.option("--batch-size", type=POSITIVE, default=8, show_default=True, help="Blocks per forward pass.")
@click.option("--gate-ppl-abs", type=finite(), default=0.25, show_default=True, help="Allowed perplexity rise (absolute).")
@click.option("--gate-ppl-rel", type=finite(), default=0.05, show_default=True, help="Allowed perplexity rise (share of base).")
@click.option("--gate-mean-p", type=finite(), default=0.02, show_default=True, help="Allowed |Δ mean reference probability|.")
@click.option("--gate-cc", type=finite(), default=0.002, show_default=True, help="Allowed |Δ confident-conflict rate|.")
@click.option("--gate-jsd", type=finite(), default=0.02, show_default=True, help="Allowed JSD of the (p, entropy) histograms.")
@click.option("--plot", default=None, help="Write a PNG of the (p, entropy) histograms here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_fail_cleanly
def eval_cmd(model: str, packs: tuple[str, ...], seq_lens: tuple[int, ...], blocks: int, compare: str | None,
             device: str | None, dtype: str, streamed: bool | None, gpu_memory: float | None,
             storage_options: dict[str, Any] | None, batch_size: int, gate_ppl_abs: float, gate_ppl_rel: float, gate_mean_p: float,
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
        from quality.report import strict_json

        click.echo(json.dumps(strict_json(result), indent=1, allow_nan=False))
    else:
        click.echo(format_table(result))
    sys.exit(1 if result["pass"] is False else 0)


@main.command("import-reap")
@click.argument("observer_file")
@click.option("--out", required=True, help="Saliency file to write (an existing file needs --force).")
@click.option("--domain", type=DOMAIN, default="reap-import", show_default=True, help="Calibration domain name to record.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--model", "model_ckpt", default=None, metavar="CKPT",
              help="The checkpoint REAP observed: the file must score its MoE layers and experts; its identity is "
                   "recorded, so plan can check the file fits.")
@_fail_cleanly
def import_reap_cmd(observer_file: str, out: str, domain: str, force: bool, model_ckpt: str | None) -> None:
    """Convert a REAP observer file (torch.save dict) into a saliency file.

    The file is read with torch.load(weights_only=True): tensors, numbers and dicts only, so a
    crafted pickle cannot run code.
    """
    from planners.saliency import model_identity
    from profiling.reap_import import import_reap
    from rewriter.core.checkpoint import Checkpoint

    refuse_existing_file(out, "--out", force)
    ckpt = Checkpoint.open(model_ckpt) if model_ckpt else None
    identity = model_identity(ckpt) if ckpt else None
    moe_layers = sorted(ckpt.layout.moe_layers(ckpt)) if ckpt else None
    sal = import_reap(observer_file, domain, model=identity, moe_layers=moe_layers)
    save_saliency(sal, out, force)
    click.echo(f"wrote {out}: {len(sal.layers)} layers from {observer_file}")


# --- serving targets and the model card ------------------------------------------------------------

@main.command()
@click.argument("ckpt")
@click.option("--target", "targets", multiple=True,
              type=click.Choice(["vllm", "sglang", "trtllm", "llamacpp", "transformers"]),
              help="Engine to check against (repeat; default: all).")
@click.option("--ep", type=click.IntRange(min=1), default=None, help="Expert-parallel size to check.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable verdicts.")
@click.option("--storage-options", type=JSON_OBJECT, default=None, help="fsspec options for CKPT as JSON.")
@_fail_cleanly
def check(ckpt: str, targets: tuple[str, ...], ep: int | None, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Would serving engines load CKPT? Print each rule's verdict (any MoE checkpoint, from headers).

    CKPT is a safetensors checkpoint (a folder or its URL) or a GGUF model (its file, or any file of a split
    GGUF); a GGUF model's fields are read from its metadata.
    Rules and their sources: docs/serving.md. Exit status 1 when a rule fails, 2 on bad input;
    warnings do not fail.
    """
    from planners.serving import TARGETS, check_facts, checkpoint_facts, failures, format_verdicts
    from rewriter.core.checkpoint import Checkpoint

    c = Checkpoint.open(ckpt, storage_options or {})
    facts = checkpoint_facts(c)
    verdicts = check_facts(facts, targets or TARGETS, ep)
    if as_json:
        click.echo(json.dumps({"checkpoint": c.url, "family": facts.family, "experts_per_layer": facts.count,
                               "top_k": facts.top_k, "ep": ep, "ok": not failures(verdicts),
                               "verdicts": [v.to_json() for v in verdicts]}, indent=1))
    else:
        click.echo(f"{c.url}: {facts.family}, {facts.count_text()} experts per layer, top-k {facts.top_k}"
                   + (f", --ep {ep}" if ep else ""))
        click.echo(format_verdicts(verdicts))
    sys.exit(EXIT_FOUND if failures(verdicts) else EXIT_OK)


@main.command()
@click.argument("dst")
@click.option("--base-model", default=None, help="Hub repo id ORG/NAME of the source (default: from an hf:// source, a Hugging Face cache folder or the config).")
@click.option("--eval", "eval_json", default=None, help="A `rewriter eval --json` result to include.")
@click.option("--verify", "run_verify", is_flag=True, help="Run `rewriter verify` and include it: against --src, else "
              "the recorded source (a local source is recorded by content only: give --src).")
@click.option("--src", "src", default=None, help="The source to verify against (with --verify).")
@click.option("--src-options", type=JSON_OBJECT, default=None, help="fsspec options for the source as JSON (with --verify).")
@click.option("--dst-options", type=JSON_OBJECT, default=None, help="fsspec options for DST as JSON.")
@_fail_cleanly
def card(dst: str, base_model: str | None, eval_json: str | None, run_verify: bool, src: str | None,
         src_options: dict[str, Any] | None, dst_options: dict[str, Any] | None) -> None:
    """Write DST/README.md again from DST/pruning.json, adding eval results and verify status.

    Each run renders the whole card, so give every extra you want in it. DST may be a GGUF output
    (its card is filed under the gguf library).
    """
    from rewriter.exec.destination import open_destination
    from rewriter.exec.hubmeta import check_base_model
    from rewriter.exec.modelcard import load_eval, update_card

    _refuse_file_as_output(dst, "DST")
    if base_model is not None:
        check_base_model(base_model)  # before a long --verify
    destination = open_destination(dst, (dst_options or {}))
    report = None
    if run_verify:
        from rewriter.exec.verify import verify as do_verify

        report = do_verify(src, dst, src_options=(src_options or {}), dst_options=(dst_options or {})).to_json()
    result = load_eval(eval_json) if eval_json else None
    update_card(destination, base_model=base_model, verify=report, eval_result=result)
    click.echo(f"wrote {destination.describe('README.md')}" + (f" (verify: {'OK' if report['ok'] else 'FAILED'})" if report else ""))


@main.command()
@click.argument("dst")
@click.option("--dst-options", type=JSON_OBJECT, default=None, help="fsspec options for DST as JSON.")
@click.option("--dry-run", is_flag=True, help="Only list what would be aborted or removed.")
@_fail_cleanly
def cleanup(dst: str, dst_options: dict[str, Any] | None, dry_run: bool) -> None:
    """Abort the multipart uploads and remove the part files and temporaries killed runs left in DST.

    Takes DST's lock first (a run still writing is never disturbed; --dry-run only reads, without
    the lock, and says when a run is in progress). A missing DST or a file is refused; a folder no
    run wrote state into is left unchanged. Finished shards stay journaled: `rewriter run` resumes
    from them; unfinished shards are written again. The status document (`rewriter status`) then
    counts only the finished shards, a run left running reads as stopped, and a note says why.
    """
    from rewriter.exec.cleanup import cleanup as do_cleanup

    lines = do_cleanup(dst, dst_options or {}, dry_run=dry_run)
    for line in lines:
        click.echo(line)
    click.echo(lines.summary)


# --- Ray Jobs: submit, status, logs (rewriter/cli_ray.py) ---------------------------------------
from rewriter.cli_ray import register as _register_ray_commands  # noqa: E402

_register_ray_commands(main)


if __name__ == "__main__":
    main()
