"""The streamed profile and eval at the layer geometry of the largest MoE presets on one GPU.

``python -m bench_io.streamed_large --preset deepseek-v3,kimi-k2 --layers 5,3 --tokens 65536 --work W --out R.json``
    for each preset, writes ``--layers`` real-size decoder layers with weights that compute
    (``synth --computing``: FP8 block-scaled experts where the release ships FP8, dequantized on
    the device by the engine; no MTP layer, which transformers does not run), profiles them with
    the streamed engine, runs ``rewriter eval --streamed`` on them, and reports peak GPU memory
    against one layer's weights, tokens/s per layer, and the extrapolation to the whole model
    (every decoder layer of the release) and 1 M tokens. Each checkpoint is removed after its
    preset is measured, so the disk holds one at a time.

``--scale-down`` shrinks hidden and expert sizes (same layer structure) to check the script on a
CPU; its numbers are not the preset's and are marked so in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_io import streamed as sb
from rewriter.tools.synth_moe import MOE_PRESETS, MoEGeometry

GiB = 1 << 30
TARGET_TOKENS = 1_000_000


def geometry(preset: str, layers: int, scale_down: bool) -> MoEGeometry:
    """``layers`` decoder layers of the preset without MTP layers (no profile runs them)."""
    g = dataclasses.replace(MOE_PRESETS[preset].with_layers(layers), mtp_layers=0)
    if not scale_down:
        return g
    mla = (64, 32, 16, 8, 16) if g.mla else None
    return dataclasses.replace(g, hidden=128, intermediate=256, moe_intermediate=64, vocab=512, num_heads=4,
                               num_kv_heads=min(g.num_kv_heads, 4), head_dim=32, mla=mla, shard_bytes=0)


def synthesize(out: Path, g: MoEGeometry) -> dict[str, Any]:
    from rewriter.tools.synth import write_checkpoint
    from rewriter.tools.synth_data import computing_chunks

    t = time.perf_counter()
    write_checkpoint(out, g, values=computing_chunks)
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    sb.log(f"synth {out.name}: {g.num_layers} layers, {size / GiB:.1f} GiB in {seconds:.0f} s")
    return {"bytes": size, "seconds": seconds}


def extrapolate(engine: dict[str, Any], tokens: int, layers: int, moe_layers: int) -> dict[str, Any]:
    """Per MoE layer (the last one run: dense-first layers are lighter) to the release's decoder
    layers and 1 M tokens: compute scales with tokens, the read hides behind compute once compute
    is longer, the load (copy to the device, dequantize) is on the critical path."""
    moe = [t for t in engine["layers"]][-moe_layers:]
    med = {k: float(np.median([t[k] for t in moe])) for k in ("read_s", "load_s", "compute_s")}
    per_layer_1m = max(med["compute_s"] * TARGET_TOKENS / tokens, med["read_s"]) + med["load_s"]
    edges_1m = (engine["embed_s"] + engine["head_s"]) * TARGET_TOKENS / tokens
    total = layers * per_layer_1m + edges_1m
    return {"moe_layer_median": med, "moe_layer_tokens_per_s": tokens / max(med["compute_s"], 1e-9),
            "weights_gib_per_moe_layer": moe[-1]["weight_bytes"] / GiB, "raw_gib_per_moe_layer": moe[-1]["raw_bytes"] / GiB,
            "peak_weight_gib": engine["peak_weight_bytes"] / GiB,
            "peak_device_gib": (engine["peak_device_bytes"] or 0) / GiB,
            "whole_model_layers": layers, "extrapolated_1m_tokens_s": total,
            "extrapolated_tokens_per_s": TARGET_TOKENS / total}


def measure(preset: str, layers: int, tokens: int, work: Path, scale_down: bool, eval_blocks: int) -> dict[str, Any]:
    g = geometry(preset, layers, scale_down)
    ckpt = work / f"{preset}-{layers}"
    out: dict[str, Any] = {"preset": preset, "layers": layers, "scaled_down": scale_down,
                           "dense_layers": g.dense_layers, "num_experts": g.num_experts, "fp8": g.fp8}
    try:
        out["synth"] = synthesize(ckpt, g)
        data = sb.token_file(work / "tokens.npy", tokens, min(g.vocab, 100_000))
        sb.streamed_run(ckpt, data, min(tokens, 4 * sb.SEQ))  # warm-up: kernels, page cache
        sal, run = sb.streamed_run(ckpt, data, tokens)
        out["profile"] = {k: v for k, v in run.items() if k not in ("engine", "engine_layers")}
        if sal is not None:
            full = MOE_PRESETS[preset]
            out["per_layer"] = run["engine_layers"]
            out["extrapolation"] = extrapolate(sal.method["engine"], run["tokens"], full.num_layers,
                                               g.num_layers - g.dense_layers)
            out["saliency_layers"] = sorted(sal.layers)
        out["eval"] = sb.eval_cli(ckpt, work, eval_blocks, min(g.vocab, 100_000))
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-v3,kimi-k2", help="Comma-separated presets of synth_moe.")
    ap.add_argument("--layers", default="5,3", help="Decoder layers per preset (comma-separated, or one for all).")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale-down", action="store_true", help="Small hidden/expert sizes: checks the script on a CPU.")
    args = ap.parse_args(argv)
    presets = args.preset.split(",")
    layers = [int(x) for x in args.layers.split(",")]
    layers = layers * len(presets) if len(layers) == 1 else layers
    sb.configure(args.seq_len, args.device)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    import transformers

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version(),
                           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                           "args": {k: str(v) for k, v in vars(args).items()}, "presets": {}}
    t = time.perf_counter()
    try:
        for preset, n in zip(presets, layers):
            try:
                doc["presets"][preset] = measure(preset, n, args.tokens, args.work, args.scale_down, args.eval_blocks)
            except Exception as e:  # one failed preset must not lose the other's results
                sb.log(f"{preset} failed: {type(e).__name__}: {e}")
                doc["presets"][preset] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        sb.write_result(doc, args.out, t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
