"""Profiler throughput at real gpt-oss geometry with random weights: hooks vs a plain forward.

``python -m profiling.gpu_bench --config tests/assets/gpt-oss-20b/config.json --out result.json``

Builds the model from the config directly on the device in bf16 (no weights are downloaded),
feeds generated token sequences, and times (a) the plain forward pass that computes the logits
with transformers' default experts implementation and with ``eager``, and (b) the profiler's
pass (observed experts, per-token confidence, spill). Reports tokens/s of each.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch


def build(config_path: str, layers: int | None, device: str):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = json.load(open(config_path))
    for k in ("quantization_config", "transformers_version", "architectures"):
        cfg.pop(k, None)
    if layers:
        cfg["num_hidden_layers"] = layers
        cfg["layer_types"] = cfg["layer_types"][:layers]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = GptOssForCausalLM(GptOssConfig(**cfg))
    torch.set_default_dtype(torch.float32)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_plain(model, batches, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    for b in batches:
        _ = model(input_ids=torch.as_tensor(b, device=device)).logits
    _sync(device)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    from profiling.profile import profile_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    t = time.perf_counter()
    model = build(args.config, args.layers, args.device)
    build_s = time.perf_counter() - t
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, vocab, args.seq_len) for _ in range(args.batches * args.batch_size)]
    batches = [np.stack(seqs[i : i + args.batch_size]) for i in range(0, len(seqs), args.batch_size)]
    tokens = len(seqs) * args.seq_len
    default_impl = model.config._experts_implementation

    time_plain(model, batches[:2], args.device)  # warm-up
    plain_default = time_plain(model, batches, args.device)
    model.config._experts_implementation = "eager"
    time_plain(model, batches[:1], args.device)
    plain_eager = time_plain(model, batches, args.device)
    model.config._experts_implementation = default_impl

    with tempfile.TemporaryDirectory() as spill:
        profile_model(model, seqs[: 2 * args.batch_size], batch_size=args.batch_size, spill_dir=spill + "/w")
        _sync(args.device)
        t = time.perf_counter()
        layers, stats = profile_model(model, seqs, batch_size=args.batch_size, spill_dir=spill + "/m")
        _sync(args.device)
        hooked = time.perf_counter() - t

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "geometry": {"layers": model.config.num_hidden_layers, "experts": model.config.num_local_experts,
                     "top_k": model.config.num_experts_per_tok, "hidden": model.config.hidden_size,
                     "vocab": vocab, "params_b": sum(p.numel() for p in model.parameters()) / 1e9},
        "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens": tokens, "build_s": build_s,
        "default_experts_implementation": default_impl,
        "plain_tokens_per_s": tokens / plain_default,
        "plain_eager_tokens_per_s": tokens / plain_eager,
        "profiled_tokens_per_s": tokens / hooked,
        "overhead_vs_plain": plain_default and hooked / plain_default - 1,
        "overhead_vs_eager": hooked / plain_eager - 1,
        "p_lo": stats.p_lo, "h_lo": stats.h_lo,
        "freq_total_layer0": float(sum(layers[0]["freq"])),
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
