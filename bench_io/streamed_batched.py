"""Layer-batched experts against batch by batch, and where a streamed run's time goes.

``python -m bench_io.streamed --stage breakdown --layers 4 --tokens 131072 ...``
    a 120B-geometry checkpoint of ``--layers`` layers, profiled streamed batch by batch and
    layer-batched with every section timed (:mod:`profiling.sections`): attention, the rest of
    the layer call (norms, residual adds), router, expert GEMMs, the observer's arithmetic, gathering and scattering routed pairs, copying and
    dequantizing weights, copying hidden states, embedding, head, and the rest.

``python -m bench_io.streamed --stage batched --layers 4 --tokens 524288 ...``
    the same checkpoint profiled batch by batch, layer-batched (chunk from the budget) and in
    chunks of 32,768 tokens, within ``--gpu-memory 24`` (tokens/s, the extrapolation
    to 36 layers and 1 M tokens, the fraction of the GPU's dense bf16 peak, peak GPU memory, how
    far the two saliencies differ), the breakdown at ``--breakdown-tokens``, then the 20B
    streamed/whole comparison of ``--stage 20b`` (``--tokens-20b``).

``python -m bench_io.streamed --stage attention --layers 4 --tokens 262144 ...``
    the same checkpoint profiled within ``--gpu-memory 24`` with the attention the engine chooses
    (flex attention for gpt-oss on CUDA) and with transformers' default (eager): tokens/s, the
    extrapolation, the breakdown of each at ``--breakdown-tokens``, how far the saliencies differ.

The stages take :mod:`bench_io.streamed` (``base``: its helpers and its settings, as configured
by its command line) from the caller, which imports this module.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

#: Dense bf16 peak of an H100 SXM, FLOP/s (without sparsity).
H100_BF16_PEAK = 989e12


def active_params(config: dict[str, Any]) -> int:
    """Parameters one token passes through in one decoder layer: attention projections, the
    router, and ``k`` experts' gate, up and down projections."""
    h = config["hidden_size"]
    head = config.get("head_dim") or h // config["num_attention_heads"]
    attn = h * head * (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"])
    experts = config.get("num_local_experts") or config.get("num_experts")
    k = config.get("num_experts_per_tok") or config.get("experts_per_token")
    return attn + h * experts + k * 3 * h * config["intermediate_size"]


def peak_share(config: dict[str, Any], tokens_per_s: float, layers: int) -> dict[str, float]:
    """FLOP/s (2 x active parameters x tokens, attention's own products not counted) and their
    share of the H100's dense bf16 peak."""
    flops = 2 * active_params(config) * layers * tokens_per_s
    return {"active_params_per_layer": active_params(config), "tflop_per_s": flops / 1e12,
            "share_of_h100_bf16_peak": flops / H100_BF16_PEAK}


def breakdown(base: ModuleType, model: Path, data: Path, tokens: int, expert_chunk: int | None, gpu_memory: int | None
              ) -> dict[str, Any]:
    """One streamed profile with every section timed; seconds, calls and shares per section."""
    from core.checkpoint import Checkpoint
    from profiling import sections
    from profiling.profile import batched, profile_streamed
    from profiling.streamed import StreamedModel

    blocks = list(np.load(data)[: tokens // base.SEQ * base.SEQ].reshape(-1, base.SEQ))
    ckpt = Checkpoint.open(str(model))
    try:
        engine = StreamedModel(ckpt, device=base.DEVICE, dtype=torch.bfloat16, gpu_memory=gpu_memory,
                               expert_chunk=expert_chunk)
        for layer in engine.base.layers:
            if isinstance(getattr(layer, "self_attn", None), torch.nn.Module):
                sections.time_module(layer.self_attn, "attention")
            mlp = layer.mlp
            router = getattr(mlp, "router", None) or getattr(mlp, "gate", None)
            if isinstance(router, torch.nn.Module):
                sections.time_module(router, "router")
            if isinstance(getattr(mlp, "experts", None), torch.nn.Module):  # sorting, gathering, scattering pairs
                sections.time_module(mlp.experts, "experts_routing")
            sections.time_module(mlp, "moe")
        found = sections.Sections(base.DEVICE)
        sections.activate(found)
        try:
            profile_streamed(engine, list(batched(blocks, 4)))
        finally:
            sections.activate(None)
    finally:
        ckpt.storage.close()
    total = engine.stats.total_s
    timed = dict(found.seconds)
    timed["other"] = max(0.0, total - sum(timed.values()))
    out = {"tokens": len(blocks) * base.SEQ, "total_s": total, "expert_chunk": engine.stats.expert_chunk,
           "seconds": timed, "share": {k: v / total for k, v in timed.items()}, "calls": dict(found.calls)}
    base.log(f"breakdown chunk {engine.stats.expert_chunk}: " +
             ", ".join(f"{k} {v:.0%}" for k, v in sorted(out["share"].items(), key=lambda x: -x[1])))
    return out


def stage_breakdown(base: ModuleType, out: dict[str, Any], work: Path, layers: int, tokens: int, preset: str) -> None:
    ckpt = work / f"{preset}-{layers}"
    out["synth"] = base.synthesize(ckpt, preset, layers)
    data = base.token_file(work / f"tokens-{preset}.npy", tokens, base._vocab(preset))
    base.streamed_run(ckpt, data, 4 * base.SEQ)  # warm-up: kernels, page cache
    out["breakdown"] = _breakdowns(base, ckpt, data, tokens)


def _breakdowns(base: ModuleType, ckpt: Path, data: Path, tokens: int) -> dict[str, Any]:
    got = {}
    for name, chunk in (("per_batch", 0), ("batched", None)):
        try:
            got[name] = breakdown(base, ckpt, data, tokens, chunk, 24 * base.GiB)
        except Exception as e:  # one failed configuration must not lose the others' results
            got[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    return got


def stage_batched(base: ModuleType, out: dict[str, Any], work: Path, layers: int, tokens: int, breakdown_tokens: int,
                  tokens_20b: int, preset: str, preset_20b: str) -> None:
    ckpt = work / f"{preset}-{layers}"
    out["synth"] = base.synthesize(ckpt, preset, layers)
    config = json.loads((ckpt / "config.json").read_text())
    data = base.token_file(work / f"tokens-{preset}.npy", tokens, base._vocab(preset))
    base.streamed_run(ckpt, data, 4 * base.SEQ)  # warm-up: kernels, page cache
    runs = {}
    for name, chunk in (("per_batch", 0), ("batched", None), ("batched_32k", 32768)):
        sal, runs[name] = base.streamed_run(ckpt, data, tokens, gpu_memory=24 * base.GiB, expert_chunk=chunk)
        if sal is not None:
            for key in ("expert_chunk", "batched_layers"):  # batched_layers 0: every layer ran batch by batch
                runs[name][key] = sal.method["engine"][key]
            eng = runs[name]["engine"]
            eng["measured"] = peak_share(config, tokens / (eng["per_layer_median"]["compute_s"] * layers), layers)
            eng["extrapolated"] = peak_share(config, eng["extrapolated_tokens_per_s"], base.TARGET_LAYERS)
            runs[name]["saliency"] = sal.layers
    if "saliency" in runs["per_batch"] and "saliency" in runs["batched"]:
        out["saliency_batched_vs_per_batch"] = base.compare(runs["batched"].pop("saliency"),
                                                            runs["per_batch"].pop("saliency"))
    for r in runs.values():
        r.pop("saliency", None)
    out.update(runs)
    if "engine" in runs["per_batch"] and "engine" in runs["batched"]:
        out["batched_vs_per_batch"] = (runs["batched"]["engine"]["extrapolated_tokens_per_s"] /
                                       runs["per_batch"]["engine"]["extrapolated_tokens_per_s"])
        base.log(f"batched/per-batch (36 layers x 1 M tokens, extrapolated): {out['batched_vs_per_batch']:.2f}x")
    if breakdown_tokens:
        out["breakdown"] = _breakdowns(base, ckpt, data, breakdown_tokens)
    if tokens_20b:
        out["20b"] = {}
        t = time.perf_counter()
        base.stage_20b(out["20b"], work, tokens_20b, preset_20b)
        out["20b"]["wall_s"] = time.perf_counter() - t


def stage_attention(base: ModuleType, out: dict[str, Any], work: Path, layers: int, tokens: int, breakdown_tokens: int,
                    preset: str) -> None:
    """The same streamed profile with the automatic attention choice (flex attention for
    gpt-oss on CUDA) and with transformers' default (eager): throughput, the extrapolation, the
    breakdown of each, and how far their saliency differs (kernel noise)."""
    import os

    from profiling.streamed import ATTENTION_ENV

    ckpt = work / f"{preset}-{layers}"
    out["synth"] = base.synthesize(ckpt, preset, layers)
    config = json.loads((ckpt / "config.json").read_text())
    data = base.token_file(work / f"tokens-{preset}.npy", tokens, base._vocab(preset))
    saliency = {}
    before = os.environ.get(ATTENTION_ENV)
    try:
        for name, choice in (("auto", "auto"), ("default", "default")):
            os.environ[ATTENTION_ENV] = choice
            t = time.perf_counter()
            base.streamed_run(ckpt, data, 4 * base.SEQ)  # warm-up: kernels (flex attention compiles), page cache
            warm = time.perf_counter() - t
            sal, run = base.streamed_run(ckpt, data, tokens, gpu_memory=24 * base.GiB)
            run["warm_up_s"] = warm
            run[ATTENTION_ENV] = choice  # on a CPU both are transformers' default
            if sal is not None:
                eng = run["engine"]
                eng["measured"] = peak_share(config, tokens / (eng["per_layer_median"]["compute_s"] * layers), layers)
                eng["extrapolated"] = peak_share(config, eng["extrapolated_tokens_per_s"], base.TARGET_LAYERS)
                saliency[name] = sal.layers
            if breakdown_tokens:
                try:
                    run["breakdown"] = breakdown(base, ckpt, data, breakdown_tokens, None, 24 * base.GiB)
                except Exception as e:  # one failed configuration must not lose the others' results
                    run["breakdown"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            out[name] = run
    finally:
        if before is None:
            os.environ.pop(ATTENTION_ENV, None)
        else:
            os.environ[ATTENTION_ENV] = before
    if len(saliency) == 2:
        out["auto_vs_default"] = base.compare(saliency["auto"], saliency["default"])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--breakdown-tokens", type=int, default=131072,
                    help="batched, attention: tokens of the breakdown (0: none).")
    ap.add_argument("--tokens-20b", type=int, default=131072, help="batched: tokens of the 20B comparison (0: none).")
    ap.add_argument("--preset-20b", default="20b", help="batched: the 20B comparison's geometry.")


def run(base: ModuleType, out: dict[str, Any], args: argparse.Namespace) -> None:
    """``--stage breakdown``, ``batched`` or ``attention`` of :mod:`bench_io.streamed`'s command line."""
    if args.stage == "breakdown":
        stage_breakdown(base, out, args.work, args.layers, args.tokens, args.preset or "120b")
    elif args.stage == "attention":
        stage_attention(base, out, args.work, args.layers, args.tokens, args.breakdown_tokens, args.preset or "120b")
    else:
        stage_batched(base, out, args.work, args.layers, args.tokens, args.breakdown_tokens, args.tokens_20b,
                      args.preset or "120b", args.preset_20b)
