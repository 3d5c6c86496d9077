"""Measure the layer-streamed engine at real gpt-oss geometry on one GPU; one call, one JSON.

``python -m bench_io.streamed --stage 20b --work /tmp/w --out result.json``
    writes a 20B-geometry checkpoint with weights that compute (``synth --computing``) and
    profiles the same tokens with the whole model and with the streamed engine: tokens/s of
    each and how far their saliency differs.

``python -m bench_io.streamed --stage 120b --layers 14 --small-layers 4 ...``
    writes a 120B-geometry checkpoint with ``--layers`` layers and profiles it streamed: with
    ``--small-layers`` and all layers (peak GPU memory must not grow), with ``--gpu-memory 24``
    and a tighter cap (hidden states spilled to host memory), then runs ``rewriter eval`` on it.
    Per-layer read, dequantize and compute times are extrapolated to 36 layers and 1 M tokens.

``python -m bench_io.streamed --stage long --tokens 1048576 ...``
    1 M calibration tokens through the 120B-geometry layers (uncapped and within 24 GiB), and
    streamed against whole model with deterministic kernels (``CUBLAS_WORKSPACE_CONFIG`` must
    be set before CUDA starts), where the saliency must be identical.

``--stage breakdown``, ``--stage batched`` and ``--stage attention`` (the automatic attention
choice, flex attention for gpt-oss on CUDA, against transformers' default):
:mod:`bench_io.streamed_batched`.

Everything runs through the project's own code paths (:func:`profiling.profile.profile` and the
``rewriter`` CLI); checkpoints are generated on the machine, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

GiB = 1 << 30
#: Calibration tokens and layers of the full gpt-oss-120b profile being extrapolated.
TARGET_TOKENS = 1_000_000
TARGET_LAYERS = 36
#: A REAP profiler's throughput on gpt-oss-120b on an H100 (the seed figure it is compared with).
REAP_H100_TOKENS_PER_S = 1551
SEQ = 2048
DEVICE = "cuda"


def configure(seq_len: int, device: str) -> None:
    global SEQ, DEVICE
    SEQ, DEVICE = seq_len, device


def _vocab(preset: str) -> int:
    from rewriter.tools.synth import PRESETS

    return min(200_000, PRESETS[preset].vocab)


def _reset_peak() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> float:
    return torch.cuda.max_memory_allocated() / GiB if DEVICE.startswith("cuda") else 0.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def synthesize(out: Path, preset: str, layers: int | None) -> dict[str, Any]:
    from rewriter.tools.synth import preset as get_preset
    from rewriter.tools.synth import write_checkpoint
    from rewriter.tools.synth_data import computing_chunks

    t = time.perf_counter()
    if not (out / "model.safetensors.index.json").exists():
        write_checkpoint(out, get_preset(preset, layers), values=computing_chunks)
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    log(f"synth {preset} x {layers or 'all'} layers: {size / GiB:.1f} GiB in {seconds:.0f} s")
    return {"preset": preset, "layers": layers, "bytes": size, "seconds": seconds}


def fewer_layers(src: Path, dst: Path, n: int) -> Path:
    """``src`` with a config of ``n`` layers (shards hard-linked): the engine runs and reads only those."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors" and not (dst / f.name).exists():
            os.link(f, dst / f.name)
    (dst / "model.safetensors.index.json").write_text((src / "model.safetensors.index.json").read_text())
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(num_hidden_layers=n, layer_types=cfg["layer_types"][:n])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def token_file(path: Path, tokens: int, vocab: int, seed: int = 0) -> Path:
    np.save(path, np.random.default_rng(seed).integers(0, vocab, tokens))
    return path


def run_profile(model: Path, data: Path, tokens: int, **kw: Any) -> tuple[Any, dict[str, Any]]:
    """Profile through :func:`profiling.profile.profile` (as ``rewriter profile`` does); the
    saliency and what was measured (the load time is the wall time outside the profile loop)."""
    from profiling.profile import profile

    _reset_peak()
    t = time.perf_counter()
    kw.setdefault("batch_size", 4)
    sal = profile(str(model), [str(data)], seq_len=SEQ, max_tokens=tokens, device=DEVICE, **kw)
    wall = time.perf_counter() - t
    loop = sal.method["seconds"]
    out = {"tokens": sal.tokens, "wall_s": wall, "profile_s": loop, "tokens_per_s": sal.tokens / loop,
           "load_s": wall - loop, "peak_gpu_gib": _peak(),
           "streamed": sal.method["streamed"], "dtype": sal.method["dtype"], "p_lo": sal.method["eaft"]["p_lo"],
           "h_lo": sal.method["eaft"]["h_lo"]}
    log(f"profile {model.name} {kw}: {sal.tokens:,} tokens, {out['tokens_per_s']:,.0f} tok/s, "
        f"wall {wall:.1f} s, peak {out['peak_gpu_gib']:.1f} GiB")
    return sal, out


def engine_summary(stats: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Per-layer means and the extrapolation to 36 layers and 1 M tokens."""
    layers = stats["layers"]
    keys = ("read_s", "wait_s", "load_s", "compute_s")
    mean = {k: float(np.mean([t[k] for t in layers])) for k in keys}
    median = {k: float(np.median([t[k] for t in layers])) for k in keys}
    per_token_layer = median["compute_s"] / tokens
    compute_1m = per_token_layer * TARGET_TOKENS
    # The reader hides behind compute once compute is longer than a read; the load (copy to the
    # device, dequantize) is on the critical path; embedding and head scale with tokens.
    per_layer_1m = max(compute_1m, median["read_s"]) + median["load_s"]
    edges_1m = (stats["embed_s"] + stats["head_s"]) * TARGET_TOKENS / tokens
    total_1m = TARGET_LAYERS * per_layer_1m + edges_1m
    return {
        "layers_run": len(layers), "tokens": tokens, "per_layer_mean": mean, "per_layer_median": median,
        "gpu_idle_s": sum(t["wait_s"] for t in layers), "gpu_idle_share": sum(t["wait_s"] for t in layers) / stats["total_s"],
        "raw_gib_per_layer": layers[-1]["raw_bytes"] / GiB, "weights_gib_per_layer": layers[-1]["weight_bytes"] / GiB,
        "read_gib_per_s": layers[-1]["raw_bytes"] / GiB / max(mean["read_s"], 1e-9),
        "embed_s": stats["embed_s"], "head_s": stats["head_s"], "total_s": stats["total_s"],
        "peak_weight_gib": stats["peak_weight_bytes"] / GiB, "peak_device_gib": (stats["peak_device_bytes"] or 0) / GiB,
        "activation_gib": stats["activation_bytes"] / GiB, "activations_on_device_gib": stats["activations_on_device"] / GiB,
        "activation_budget_gib": stats["activation_budget"] / GiB,
        "extrapolated_36_layers_1m_tokens_s": total_1m,
        "extrapolated_tokens_per_s": TARGET_TOKENS / total_1m,
        "vs_reap_h100": TARGET_TOKENS / total_1m / REAP_H100_TOKENS_PER_S,
    }


def streamed_run(model: Path, data: Path, tokens: int, **kw: Any) -> tuple[Any, dict[str, Any]]:
    try:
        sal, out = run_profile(model, data, tokens, streamed=True, **kw)
    except Exception as e:  # one failed configuration must not lose the others' results
        log(f"profile {model.name} {kw} failed: {type(e).__name__}: {e}")
        return None, {"error": f"{type(e).__name__}: {e}"[:2000]}
    out["engine"] = engine_summary(sal.method["engine"], out["tokens"])
    out["engine_layers"] = sal.method["engine"]["layers"]
    return sal, out


def compare(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """How far two saliency results (per layer) differ."""
    same_freq, worst = 0, {"reap": 0.0, "eaft_reap": 0.0}
    for i in a:
        same_freq += int(a[i]["freq"] == b[i]["freq"])
        for key in worst:
            x, y = np.array(a[i][key]), np.array(b[i][key])
            worst[key] = max(worst[key], float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-12))))
    return {"layers": len(a), "layers_with_identical_freq": same_freq, "max_rel_diff_reap": worst["reap"],
            "max_rel_diff_eaft_reap": worst["eaft_reap"]}


def whole_run(model: Path, data: Path, tokens: int) -> tuple[dict[int, Any], dict[str, Any]]:
    """The whole model on the GPU (loaded once, warmed up), on the blocks profile() would cut."""
    from profiling.profile import load_model, profile_model

    _reset_peak()
    t = time.perf_counter()
    m = load_model(str(model), DEVICE, torch.bfloat16)
    load_s = time.perf_counter() - t
    blocks = list(np.load(data)[:tokens].reshape(-1, SEQ))
    profile_model(m, blocks[:4], batch_size=4)
    layers, stats = profile_model(m, blocks, batch_size=4)
    out = {"tokens": stats.tokens, "load_s": load_s, "profile_s": stats.seconds,
           "tokens_per_s": stats.tokens / stats.seconds, "peak_gpu_gib": _peak(),
           "p_lo": stats.p_lo, "h_lo": stats.h_lo}
    log(f"whole model: load {load_s:.0f} s, {out['tokens_per_s']:,.0f} tok/s, peak {out['peak_gpu_gib']:.1f} GiB")
    del m
    _reset_peak()
    return layers, out


def stage_20b(out: dict[str, Any], work: Path, tokens: int, preset: str) -> None:
    ckpt = work / preset
    out["synth"] = synthesize(ckpt, preset, None)
    data = token_file(work / f"tokens-{preset}.npy", tokens, _vocab(preset))
    streamed_run(ckpt, data, 4 * SEQ)  # warm-up: kernels, page cache
    sal, streamed = streamed_run(ckpt, data, tokens)
    layers, whole = whole_run(ckpt, data, tokens)
    out.update(whole=whole, streamed=streamed, saliency=compare(sal.layers, layers),
               streamed_vs_whole=streamed["tokens_per_s"] / whole["tokens_per_s"])
    log(f"20b: streamed/whole throughput {out['streamed_vs_whole']:.3f}; saliency {out['saliency']}")


def stage_120b(out: dict[str, Any], work: Path, layers: int, small: int, tokens: int, eval_blocks: int,
               preset: str, whole: bool) -> None:
    full = work / f"{preset}-{layers}"
    out["synth"] = synthesize(full, preset, layers)
    few = fewer_layers(full, work / f"{preset}-{small}", small)
    data = token_file(work / f"tokens-{preset}.npy", tokens, _vocab(preset))
    streamed_run(few, data, 4 * SEQ)  # warm-up
    first, out[f"layers_{small}"] = streamed_run(few, data, tokens)
    again, _ = streamed_run(few, data, tokens)
    if first is not None and again is not None:
        # The same run twice: GPU kernels that add with atomics (index_add_) differ run to run.
        out["saliency_streamed_twice"] = compare(again.layers, first.layers)
    sal, out[f"layers_{layers}"] = streamed_run(full, data, tokens)
    out[f"layers_{layers}_gpu_memory_24"] = streamed_run(full, data, tokens, gpu_memory=24 * GiB)[1]
    out[f"layers_{small}_gpu_memory_12_batch_1"] = streamed_run(few, data, tokens, gpu_memory=12 * GiB,
                                                                batch_size=1)[1]
    out["eval"] = eval_cli(full, work, eval_blocks, _vocab(preset))
    if whole:
        layers_whole, out[f"layers_{layers}_whole_model"] = whole_run(full, data, tokens)
        if sal is not None:
            out["saliency_streamed_vs_whole"] = compare(sal.layers, layers_whole)


def stage_long(out: dict[str, Any], work: Path, layers: int, small: int, tokens: int, preset: str) -> None:
    """``tokens`` (1 M) through ``layers`` layers, uncapped and within 24 GiB; then streamed and
    whole model on ``small`` layers with deterministic kernels, where saliency must be identical."""
    full = work / f"{preset}-{layers}"
    out["synth"] = synthesize(full, preset, layers)
    few = fewer_layers(full, work / f"{preset}-{small}", small)
    data = token_file(work / f"tokens-{preset}.npy", tokens, _vocab(preset))
    streamed_run(few, data, 4 * SEQ)  # warm-up
    out[f"layers_{layers}"] = streamed_run(full, data, tokens)[1]
    out[f"layers_{layers}_gpu_memory_24"] = streamed_run(full, data, tokens, gpu_memory=24 * GiB)[1]
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        check = min(tokens, 32 * SEQ)
        sal, out[f"layers_{small}_deterministic"] = streamed_run(few, data, check)
        again, _ = streamed_run(few, data, check)
        whole, out[f"layers_{small}_whole_model_deterministic"] = whole_run(few, data, check)
        if sal is not None and again is not None:
            out["deterministic_streamed_twice"] = compare(again.layers, sal.layers)
            out["deterministic_streamed_vs_whole"] = compare(sal.layers, whole)
            log(f"deterministic: twice {out['deterministic_streamed_twice']}, "
                f"vs whole {out['deterministic_streamed_vs_whole']}")
    finally:
        torch.use_deterministic_algorithms(False)


def _release_device() -> float | None:
    """Hand this process's cached device memory back before a command runs in another process
    (the caching allocator keeps a profile's peak otherwise); the device's free GiB after."""
    if not DEVICE.startswith("cuda"):
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0] / GiB


def eval_cli(model: Path, work: Path, blocks: int, vocab: int) -> dict[str, Any]:
    """``rewriter eval MODEL --compare MODEL --streamed`` through the CLI, as a user runs it
    (a few layers of 120B geometry would fit the GPU whole; the 36 of the real model do not)."""
    pack = token_file(work / "eval-pack.npy", blocks * SEQ, vocab, seed=1)
    free = _release_device()
    cmd = [sys.executable, "-m", "rewriter.cli", "eval", str(model), "--data", str(pack), "--seq-len", str(SEQ),
           "--blocks", str(blocks), "--batch-size", "4", "--compare", str(model), "--device", DEVICE, "--streamed",
           "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    log(f"eval: exit {proc.returncode} in {wall:.0f} s")
    if proc.returncode not in (0, 1):
        return {"exit": proc.returncode, "stderr": proc.stderr[-4000:], "stdout": proc.stdout[-4000:],
                "wall_s": wall, "device_free_gib_at_start": free}
    result = json.loads(proc.stdout)
    row = result["rows"][-1]
    return {"exit": proc.returncode, "wall_s": wall, "device_free_gib_at_start": free, "pass": result["pass"], "tokens": row["tokens"], "ppl": row["ppl"],
            "base_ppl": row["base"]["ppl"], "mean_p": row["mean_p"], "mean_entropy": row["mean_entropy"],
            "engine_total_s": result["engine"]["total_s"], "engine_peak_device_gib":
            (result["engine"]["peak_device_bytes"] or 0) / GiB}


def write_result(doc: dict[str, Any], out: Path, t0: float) -> None:
    """The benchmark's JSON with its wall time, written whatever happened (a failed stage keeps
    what the others measured)."""
    doc["wall_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=("20b", "120b", "long", "breakdown", "batched", "attention"), required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--small-layers", type=int, default=4)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--whole", action="store_true", help="120b: also profile the whole model (it must fit).")
    ap.add_argument("--preset", default=None, help="Geometry (default: the stage's); a small one checks the script.")
    ap.add_argument("--seq-len", type=int, default=SEQ)
    ap.add_argument("--device", default=DEVICE)
    from bench_io import streamed_batched

    streamed_batched.add_arguments(ap)
    args = ap.parse_args(argv)
    configure(args.seq_len, args.device)
    # A time limit's SIGTERM still writes what was measured so far.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    import transformers

    args.work.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"),
                           "device": torch.cuda.get_device_name() if DEVICE.startswith("cuda") else platform.processor() or "cpu",
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version(), "stage": args.stage, "args": {
                               k: str(v) for k, v in vars(args).items()}}
    t = time.perf_counter()
    try:
        if args.stage in ("breakdown", "batched", "attention"):  # this module as configured (run with -m: __main__)
            streamed_batched.run(sys.modules[__name__], doc, args)
        elif args.stage == "20b":
            stage_20b(doc, args.work, args.tokens, args.preset or "20b")
        elif args.stage == "long":
            stage_long(doc, args.work, args.layers, args.small_layers, args.tokens, args.preset or "120b")
        else:
            stage_120b(doc, args.work, args.layers, args.small_layers, args.tokens, args.eval_blocks,
                       args.preset or "120b", args.whole)
    finally:
        write_result(doc, args.out, t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
