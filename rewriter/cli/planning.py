"""``plan`` and ``stability``: deciding what to keep and what it costs."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import click

from core.memo import collector_paused
from rewriter.cli.errors import fail_cleanly as _fail_cleanly
from rewriter.cli.group import main
from rewriter.cli.params import (
    BUFFER_MIB,
    JSON_OBJECT,
    LINK_MBPS,
    MAX_LATENCY_MS,
    MAX_MBPS,
    MIN_MBPS,
    NON_NEGATIVE,
    POSITIVE,
    SIZE,
    MiB,
    finite,
    options_group,
    save_plan,
)

policy_options = options_group(
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


serving_options = options_group(
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
    from core.errors import OptionError
    from planners import PlanOptions, plan_prune
    from planners.policies import KeepPolicy

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


cost_options = options_group(
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
@collector_paused()  # a 1 T checkpoint's plan is millions of objects without cycles: nothing to collect
def plan(src: str, layers: str | None, buffer_mib: int, out: str | None, as_json: bool, verbose: bool,
         workers: int, read_mbps: float | None, write_mbps: float | None, measure_bandwidth: str | None,
         latency_ms: float, inflight: int | None, max_gap_kib: int, link_mbps: float, **kw: Any) -> None:
    """Plan the pruning of SRC and print its I/O cost and what it keeps (nothing is written but --out).

    SRC is a safetensors checkpoint (a folder or its URL) or a GGUF model (its file, or any file of a split
    GGUF); the plan's outputs are of the same format.
    """
    from core.aside import Aside
    from core.storage import is_local_url
    from planners.cost import estimate, format_report
    from rewriter.exec.io import IOOptions

    p, n_exp = make_plan(src, layers_only=_parse_layers(layers, "--layers"), **kw)
    read_bw, write_bw = _bandwidths(read_mbps, write_mbps, measure_bandwidth)
    requests = inflight if inflight is not None else 0 if is_local_url(p.source_url) else IOOptions().inflight_requests

    def cost() -> Any:
        return estimate(p, workers=workers, read_bytes_per_s=read_bw, write_bytes_per_s=write_bw,
                        buffer_bytes=buffer_mib * MiB, latency_s=latency_ms / 1000, inflight=requests,
                        max_gap=max_gap_kib * 1024, link_bytes_per_s=link_mbps * 1e6)

    with Aside(cost) if out else contextlib.nullcontext() as costing:  # costed while the plan is written
        if out:
            save_plan(p, out, "--out")
            p.digest  # noqa: B018 (made here, beside the costing, for the last line)
        report = costing.result() if costing else cost()
    if as_json:
        click.echo(json.dumps({"plan": out, "plan_digest": p.digest, "num_experts": n_exp, **keep_json(p),
                               "cost": report.to_json()}, indent=1))
        return
    click.echo(format_report(report))
    for line in keep_summary(p, n_exp, ids=verbose):
        click.echo(line)
    if out:
        click.echo(f"plan:       {out} ({p.digest[:12]})")


def keep_json(p: Any) -> dict[str, Any]:
    """What a plan keeps, for ``--json``: top-k, kept ids and old -> new expert ids per layer."""
    return {"top_k": p.top_k, "keep": {str(k): list(v) for k, v in sorted(p.keep.items())},
            "expert_mapping": p.expert_mapping(), "loadable_by_transformers": p.loadable}


def _bandwidths(read_mbps: float | None, write_mbps: float | None, measure_dir: str | None) -> tuple[float, float]:
    read_bw, write_bw = 1e9, 1e9
    if measure_dir:
        from rewriter.exec.io import measure_disk

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


