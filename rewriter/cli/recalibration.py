"""``recalibrate``: fit a pruned plan's routers to the original model's outputs (needs torch)."""

from __future__ import annotations

import os
from typing import Any

import click

from rewriter.cli.errors import fail_cleanly as _fail_cleanly
from rewriter.cli.group import main
from rewriter.cli.params import (
    JSON_OBJECT,
    NON_NEGATIVE,
    POSITIVE,
    finite,
    refuse_plan_out,
    save_plan,
)

#: Seeds the fit derives per-layer generators from (seed x 1,000,003 + layer) must stay within
#: torch's 64-bit seeds.
SEED_MAX = 2**32 - 1


@main.command()
@click.argument("src")
@click.option("--plan", "plan_file", required=True, metavar="PLAN",
              help="The plan to recalibrate (made by `rewriter plan` from SRC).")
@click.option("--data", "data", multiple=True, required=True,
              help="Calibration file: .jsonl (text or input_ids), .npy ids, or plain text (repeat).")
@click.option("--out", required=True, help="Plan file to write (it carries the new router rows).")
@click.option("--tokens", type=click.IntRange(min=2), default=65536, show_default=True,
              help="Tokens sampled per MoE layer to fit on (an eighth of them held out to judge the fit).")
@click.option("--steps", type=NON_NEGATIVE, default=200, show_default=True,
              help="Adam steps per layer (0: measure only; the plain prune's rows stay).")
@click.option("--lr", type=finite(0, min_open=True), default=0.1, show_default=True,
              help="Adam's step size in units of the router weight's RMS / sqrt(hidden size): about the share "
                   "of a logit's spread one step may move (cosine-decayed to 0).")
@click.option("--batch-tokens", type=POSITIVE, default=4096, show_default=True, help="Tokens per Adam step.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True,
              help="Seed of the token sample, the held-out split and the minibatches.")
@click.option("--seq-len", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Tokens per packed sequence.")
@click.option("--max-tokens", type=POSITIVE, default=None, help="Calibration tokens to run at most.")
@click.option("--batch-size", type=POSITIVE, default=1, show_default=True, help="Sequences per forward pass.")
@click.option("--device", default=None, help="cuda[:N] or cpu (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Compute dtype; auto: the checkpoint's own (MXFP4 experts: bfloat16).")
@click.option("--gpu-memory", type=finite(), default=None, metavar="GB",
              help="Device memory to stay within (GiB); hidden states beyond it go to host memory.")
@click.option("--storage-options", type=JSON_OBJECT, default=None, help="fsspec options for SRC as JSON.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@_fail_cleanly
def recalibrate(src: str, plan_file: str, data: tuple[str, ...], out: str, tokens: int, steps: int, lr: float,
                batch_tokens: int, seed: int, seq_len: int, max_tokens: int | None, batch_size: int,
                device: str | None, dtype: str, gpu_memory: float | None, storage_options: dict[str, Any] | None,
                quiet: bool) -> None:
    """Fit the routers of PLAN's pruned model so each MoE layer's output matches SRC's.

    SRC (the checkpoint PLAN was made from) runs one decoder layer at a time on the calibration
    text, in the device memory `profile --streamed` needs. At each MoE layer the kept experts'
    router rows (and the router bias, where the family has one) are fitted with Adam so that the
    pruned layer's output matches the original layer's in mean squared error; a layer keeps its
    new rows only when the error on held-out tokens went down. Expert weights never change.
    Writes a plan carrying the new router tensors: `rewriter run` and `verify` take it as any
    plan. Families: gpt-oss, Qwen2/3-MoE, Mixtral, OLMoE. Objective, optimiser and limits:
    docs/recalibration.md. Needs the torch extra (pip install '.[torch]').
    """
    from planners.plan import Plan
    from profiling.recal_fit import FitSettings
    from profiling.recalibrate import recalibrate as run_recalibration
    from rewriter.cli.gpu import _engine_kwargs

    kw = _engine_kwargs(device, dtype, gpu_memory, storage_options, None, None)
    del kw["devices"], kw["expert_chunk"]  # one device, batch by batch: see profiling.recalibrate
    if os.path.abspath(out) == os.path.abspath(plan_file):
        raise click.BadParameter(f"{out} is the plan to recalibrate; write the new plan to another file",
                                 param_hint="--out")
    refuse_plan_out(out, "--out")  # before the fit, not after hours of it
    plan = Plan.load(plan_file)
    settings = FitSettings(tokens=tokens, steps=steps, lr=lr, batch_tokens=batch_tokens, seed=seed)

    def say(fit: Any, done: int, total: int) -> None:
        if not quiet:
            verdict = "new rows" if fit.accepted else "not lowered: the plain prune's rows stay"
            click.echo(f"recalibrate: layer {fit.layer} ({done}/{total}): held-out relative MSE "
                       f"{fit.mse_before:.4g} -> {fit.mse_after:.4g}, {verdict} ({fit.seconds:.1f} s)", err=True)

    result = run_recalibration(src, plan, list(data), settings=settings, seq_len=seq_len, max_tokens=max_tokens,
                               batch_size=batch_size, on_fit=say, **kw)
    save_plan(result.plan, out, "--out")
    fits = result.layers
    changed = sum(f.accepted for f in fits)
    before, after = (sum(v) / max(len(v), 1) for v in ([f.mse_before for f in fits], [f.mse_after for f in fits]))
    click.echo(f"wrote {out}: {changed} of {len(fits)} MoE layers with new router rows; held-out relative MSE "
               f"mean {before:.4g} -> {after:.4g} "
               f"({result.method['tokens']['sampled_per_layer']:,} tokens per layer of "
               f"{result.method['tokens']['calibration']:,}); next: rewriter run {out} --out DST{_sidecar_note(result.plan)}")


def _sidecar_note(plan: Any) -> str:
    """Where the new router bytes went, when a file beside the plan holds them: it must travel with it."""
    from planners.carried_field import carried_json

    side = carried_json(plan).get("sidecar") if plan.carried is not None else None
    return f" (the new router bytes are in {side} beside the plan: copy or move the two together)" if side else ""
