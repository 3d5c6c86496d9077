"""``profile``, ``eval`` and ``import-reap``: saliency and quality measured with torch."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from rewriter.cli.errors import fail_cleanly as _fail_cleanly
from rewriter.cli.group import main
from rewriter.cli.params import (
    DOMAIN,
    JSON_OBJECT,
    POSITIVE,
    finite,
    options_group,
    refuse_existing_file,
    refuse_missing_folder,
    save_saliency,
)

#: Options of the commands that run a model: device, dtype, streaming, memory cap, storage.
engine_options = options_group(
    click.option("--device", default=None, help="cuda[:N] or cpu (default: cuda when available)."),
    click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
                 show_default=True, help="Compute dtype; auto: the checkpoint's own (MXFP4 experts: bfloat16)."),
    click.option("--streamed/--no-streamed", default=None,
                 help="Run one decoder layer at a time (default: when the model does not fit the device)."),
    click.option("--gpu-memory", type=finite(), default=None, metavar="GB",
                 help="Device memory to stay within (GiB; per device with --devices); hidden states beyond it go "
                      "to host memory."),
    click.option("--storage-options", type=JSON_OBJECT, default=None,
                 help="fsspec options for MODEL as JSON (endpoint_url, key…)."),
    click.option("--devices", default=None, metavar="LIST",
                 help="Split the batches across devices, one process each, streamed: cuda:0,cuda:1 or all "
                      "(every visible GPU); replaces --device."),
    click.option("--expert-chunk", type=click.IntRange(min=0), default=None, metavar="TOKENS",
                 help="Streamed: tokens each layer's experts take at once, over several batches (default: what "
                      "--gpu-memory leaves room for; 0: batch by batch)."),
)


def _engine_kwargs(device: str | None, dtype: str, gpu_memory: float | None, storage_options: dict[str, Any] | None,
                   devices: str | None, expert_chunk: int | None, streamed: bool | None = None) -> dict[str, Any]:
    import torch

    if expert_chunk is not None and streamed is False:
        # The whole-model forward has no layer-batched experts: the option would do nothing.
        raise click.BadParameter("it sets the streamed engine's expert batches; drop --expert-chunk, or "
                                 "drop --no-streamed", param_hint="--expert-chunk")

    if gpu_memory is not None and not 0 < gpu_memory <= 1 << 20:
        raise click.BadParameter(f"{gpu_memory} is not a number of GiB between 0 and {1 << 20:,}",
                                 param_hint="--gpu-memory")
    if devices is not None and device is not None:
        raise click.BadParameter("give --device or --devices, not both", param_hint="--devices")
    listed = None
    if devices is not None:
        from profiling.devices import parse_devices

        listed = parse_devices(devices)
    return {"device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "dtype": None if dtype == "auto" else getattr(torch, dtype),
            "gpu_memory": None if gpu_memory is None else int(gpu_memory * (1 << 30)),
            "storage_options": storage_options or {}, "devices": listed, "expert_chunk": expert_chunk}


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
            storage_options: dict[str, Any] | None, devices: str | None, expert_chunk: int | None, force: bool,
            quiet: bool) -> None:
    """Measure each expert's saliency (freq, REAP, EAFT-REAP) of MODEL on calibration text.

    MODEL is a checkpoint of any supported MoE family (rewriter inspect lists them), in a local
    folder or at an fsspec URL (s3://, hf://…). A model that does not fit the device is run one
    decoder layer at a time (--streamed); --devices splits the tokens across several GPUs. On
    CUDA, gpt-oss runs flex attention; REWRITER_ATTENTION=auto|default|eager|sdpa|flex_attention
    overrides the choice (docs/streaming.md). Needs the torch extra (pip install '.[torch]').
    """
    from profiling.profile import profile as run_profile

    kw = _engine_kwargs(device, dtype, gpu_memory, storage_options, devices, expert_chunk, streamed)
    refuse_existing_file(out, "--out", force)  # before the profile, not after hours of it
    refuse_missing_folder(out, "--out")
    bar = TokenProgress(enabled=not quiet)
    try:
        sal = run_profile(model, list(data), domain=domain, seq_len=seq_len, max_tokens=max_tokens,
                          batch_size=batch_size, streamed=streamed, progress=bar,
                          on_layer=bar.layer, **kw)
    finally:
        bar.close()
    save_saliency(sal, out, force)
    how = "streamed" if sal.method.get("streamed") else "whole model"
    click.echo(f"wrote {out}: domain {domain}, {sal.tokens:,} tokens, {len(sal.layers)} MoE layers, "
               f"{sal.method['seconds']:.1f} s ({sal.tokens / max(sal.method['seconds'], 1e-9):,.0f} tokens/s, "
               f"{how}, {sal.method['dtype']})")


class TokenProgress:
    """Tokens profiled and tokens/s on stderr: redrawn in place on a terminal, otherwise a plain
    line every few seconds (as :class:`rewriter.tools.progress.ByteProgress` does for bytes)."""

    def __init__(self, enabled: bool = True, log_every: float = 5.0):
        from rewriter.exec.io.throttle import Throttle
        from rewriter.tools.progress import is_terminal

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
             storage_options: dict[str, Any] | None, devices: str | None, expert_chunk: int | None, batch_size: int,
             gate_ppl_abs: float, gate_ppl_rel: float, gate_mean_p: float,
             gate_cc: float, gate_jsd: float, plot: str | None, as_json: bool) -> None:
    """Teacher-forced quality of MODEL per pack; with --compare, deltas and near-lossless gates.

    Exit status 1 when --compare is given and any gate fails (rule: docs/eval.md). Models that
    do not fit the device are run one decoder layer at a time (--streamed; docs/streaming.md);
    --devices splits the blocks across several GPUs. On CUDA, gpt-oss runs flex attention;
    REWRITER_ATTENTION overrides the choice (docs/streaming.md).
    """
    from quality.evaluate import evaluate, format_table, plot_histograms
    from quality.gates import Gates

    gates = Gates(gate_ppl_abs, gate_ppl_rel, gate_mean_p, gate_cc, gate_jsd)
    result = evaluate(model, list(packs), seq_lens=seq_lens or (1024,), blocks=blocks, compare=compare,
                      gates=gates, batch_size=batch_size, streamed=streamed,
                      **_engine_kwargs(device, dtype, gpu_memory, storage_options, devices, expert_chunk,
                                       streamed))
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
    from core.checkpoint import Checkpoint
    from planners.saliency import model_identity
    from profiling.reap_import import import_reap

    refuse_existing_file(out, "--out", force)
    ckpt = Checkpoint.open(model_ckpt) if model_ckpt else None
    identity = model_identity(ckpt) if ckpt else None
    moe_layers = sorted(ckpt.layout.moe_layers(ckpt)) if ckpt else None
    sal = import_reap(observer_file, domain, model=identity, moe_layers=moe_layers)
    save_saliency(sal, out, force)
    click.echo(f"wrote {out}: {len(sal.layers)} layers from {observer_file}")
