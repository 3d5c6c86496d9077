"""Time router recalibration at gpt-oss-120b geometry on one GPU; one call, one JSON.

``python -m bench_io.recal --work /tmp/w --out result.json [--layers 4] [--tokens 1048576] [--gpu-memory 24]``

Writes a 120B-geometry checkpoint of ``--layers`` layers with weights that compute (``synth
--computing``), plans a prune at half the experts from synthetic saliency, and recalibrates the
plan on ``--tokens`` calibration tokens of random ids through :func:`profiling.recalibrate.recalibrate`
(what ``rewriter recalibrate`` runs), once per ``--gpu-memory`` given (``0``: no cap). Records
per layer the read, dequantize, forward and fit times and the held-out errors, and the peak GPU
memory; extrapolates to 36 layers (the forward scales with calibration tokens, the fit with
``--fit-tokens`` and ``--steps``, not with calibration tokens). The weights are synthetic, so
the errors say that the fit runs, not how much it helps a real model.

``--preset tiny --device cpu --tokens 4096 --fit-tokens 1024 --steps 5 --seq-len 256`` checks
the script on a CPU.
"""

from __future__ import annotations

import argparse
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_io.streamed import (
    TARGET_LAYERS,
    TARGET_TOKENS,
    GiB,
    log,
    synthesize,
    token_file,
    write_result,
)


def make_plan(model: Path, work: Path, keep_frac: float):
    """A plan at ``keep_frac`` of the experts from deterministic synthetic saliency."""
    from core.checkpoint import Checkpoint
    from planners import PlanOptions, plan_prune
    from planners.policies import KeepPolicy
    from planners.saliency import model_identity
    from rewriter.tools.synth import synthetic_saliency

    ckpt = Checkpoint.open(str(model))
    layout = ckpt.layout
    sal = synthetic_saliency(len(layout.moe_layers(ckpt)), layout.num_experts(ckpt.config),
                             layout.top_k(ckpt.config), seed=1, model=model_identity(ckpt))
    path = work / "saliency.json"
    sal.save(path)
    plan_path = work / "plan.json"
    plan = plan_prune(ckpt, PlanOptions(saliency=(str(path),), policy=KeepPolicy(keep_frac=keep_frac)))
    plan.save(str(plan_path))
    from planners.plan import Plan

    return Plan.load(str(plan_path))


def run_once(model: Path, plan: Any, data: Path, args: argparse.Namespace, gpu_memory: float) -> dict[str, Any]:
    from profiling.recal_fit import FitSettings
    from profiling.recalibrate import recalibrate

    settings = FitSettings(tokens=args.fit_tokens, steps=args.steps, batch_tokens=args.batch_tokens)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = recalibrate(str(model), plan, [str(data)], settings=settings, seq_len=args.seq_len, max_tokens=args.tokens,
                      batch_size=args.batch_size, device=args.device,
                      gpu_memory=int(gpu_memory * GiB) if gpu_memory else None,
                      on_fit=lambda f, done, total: log(f"layer {f.layer} ({done}/{total}): {f.mse_before:.4g} -> "
                                                        f"{f.mse_after:.4g} in {f.seconds:.2f} s"))
    wall = time.perf_counter() - t
    stats = res.engine
    fit_s = {f.layer: f.seconds for f in res.layers}
    layers = [{**t, "fit_s": fit_s.get(t["layer"], 0.0), "forward_s": t["compute_s"] - fit_s.get(t["layer"], 0.0)}
              for t in stats["layers"]]
    tokens = res.method["tokens"]["calibration"]
    med = {k: float(np.median([t[k] for t in layers])) for k in ("read_s", "load_s", "forward_s", "fit_s")}
    # The reader hides behind the forward once the forward is longer than a read; loading and
    # fitting are on the critical path; embedding and head scale with tokens.
    per_layer = max(med["forward_s"] * TARGET_TOKENS / tokens, med["read_s"]) + med["load_s"] + med["fit_s"]
    total = TARGET_LAYERS * per_layer + (stats["embed_s"] + stats["head_s"]) * TARGET_TOKENS / tokens
    peak = (stats["peak_device_bytes"] or 0) / GiB
    log(f"gpu-memory {gpu_memory or 'uncapped'}: {tokens:,} tokens, {len(layers)} layers in {wall:.1f} s, "
        f"peak {peak:.1f} GiB; 36 layers x 1 M tokens ~ {total:.0f} s")
    return {"gpu_memory_gib": gpu_memory or None, "tokens": tokens, "wall_s": wall, "peak_gpu_gib": peak,
            "per_layer_median": med, "layers": layers, "fits": [{"layer": f.layer, **f.summary()} for f in res.layers],
            "activation_gib": stats["activation_bytes"] / GiB,
            "activations_on_device_gib": stats["activations_on_device"] / GiB,
            "extrapolated_36_layers_1m_tokens_s": total, "method": res.method}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench_io.recal")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="120b", help="Geometry (a small one checks the script).")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1_048_576, help="Calibration tokens run through the model.")
    ap.add_argument("--fit-tokens", type=int, default=65536, help="recalibrate --tokens: sampled per layer.")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--gpu-memory", type=float, action="append", default=None,
                    help="GiB to stay within (repeat: one run each; 0: no cap). Default: 24.")
    ap.add_argument("--keep-frac", type=float, default=0.5)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a time limit still writes what was measured
    import transformers

    args.work.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"),
                           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    t = time.perf_counter()
    try:
        model = args.work / f"{args.preset}-{args.layers}"
        doc["synth"] = synthesize(model, args.preset, args.layers)
        plan = make_plan(model, args.work, args.keep_frac)
        data = token_file(args.work / "calib.npy", args.tokens, min(200_000, int(plan.config["vocab_size"])))
        for cap in args.gpu_memory or [24.0]:
            try:
                doc["runs"].append(run_once(model, plan, data, args, cap))
            except Exception as e:  # one failed configuration must not lose the others' results
                log(f"gpu-memory {cap}: {type(e).__name__}: {e}")
                doc["runs"].append({"gpu_memory_gib": cap, "error": f"{type(e).__name__}: {e}"[:2000]})
    finally:
        write_result(doc, args.out, t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
