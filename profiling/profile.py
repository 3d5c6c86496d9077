"""``rewriter profile``: expert saliency of an MoE model on calibration text.

The whole model on one device (one forward pass per batch of packed sequences), or the
layer-streamed engine (:mod:`profiling.streamed`) when it does not fit or ``streamed=True``. Per MoE layer and expert the observer
(:mod:`profiling.observer`) accumulates the routed-token count and the sum of routing weight x
expert output norm (float64); per token the model's probability of the reference (next) token
``p`` and its normalized top-20 entropy ``H`` are computed from the final hidden states in
chunks. EAFT-REAP needs the 15th percentiles of ``p`` and ``H`` over all profiled tokens, so each
forward's per-pair contributions are spilled to disk (:mod:`profiling.spill`); after the last
batch the exact thresholds are found by streaming and the spill is reduced. RAM stays bounded by
the batch, whatever the number of tokens; disk holds ``6 x k`` bytes per token and MoE layer.

The last position of each sequence has no reference token: it counts for frequency and REAP,
not for EAFT-REAP (no ``p``, no ``H``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.checkpoint import Checkpoint
from core.errors import CheckpointError, RewriterError
from core.layouts import PER_LAYER_FIELD
from planners.saliency import Saliency, model_identity
from profiling.collect import (
    H_QUANTILE,
    P_QUANTILE,
    TOP_ENTROPY,
    ProfileStats,
    observe_streamed,
    record_pairs,
    reference_scores,
    saliency_layers,
)
from profiling.data import LazyTokenizer, documents, pack
from profiling.devices import device_list, streamed_with
from profiling.observer import ExpertObserver
from profiling.spill import Spill
from profiling.streamed import HEAD_CHUNK, StreamedModel, check_device, fits, set_attention
from profiling.weights import checkpoint_dtype

log = logging.getLogger(__name__)



def load_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """A causal LM from ``path`` in ``dtype``; MXFP4 (gpt-oss) checkpoints are dequantized."""
    import json

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = json.loads((Path(path) / "config.json").read_text())
    if PER_LAYER_FIELD in cfg:
        raise CheckpointError(f"{Path(path) / 'config.json'}: its layers keep different expert counts "
                              f"({PER_LAYER_FIELD}), and transformers builds every layer with one count, so it "
                              f"cannot load this checkpoint; evaluate a uniform prune (plan without --budget)")
    kw: dict[str, Any] = {"dtype": dtype}
    if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    if device != "cpu":  # straight to the device: no full copy in host memory first
        kw["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    set_attention(model, torch.device(device), path)
    return model.to(device).eval()



def token_confidence(model, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int = HEAD_CHUNK):
    """Per position: probability of the next token and top-20 entropy / ln 20 (last: NaN)."""
    logp, h = reference_scores(model.lm_head, hidden, input_ids, chunk)
    return logp.exp(), h


def batched(seqs: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """``[B, T]`` batches of up to ``batch_size`` sequences; sequences of unequal length
    (a short final block) go one per batch."""
    pending: list[np.ndarray] = []

    def flush() -> Iterator[np.ndarray]:
        if len({len(x) for x in pending}) == 1:
            yield np.stack(pending)
        else:
            yield from (x[None] for x in pending)
        pending.clear()

    for seq in seqs:
        pending.append(seq)
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


@torch.no_grad()
def profile_model(
    model,
    batches: Sequence[np.ndarray] | Any,
    *,
    batch_size: int = 1,
    spill_dir: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[int, dict[str, tuple[float, ...]]], ProfileStats]:
    """Profile a loaded ``model`` on packed sequences.

    Returns:
        Per MoE layer ``{"freq", "reap", "eaft_reap"}`` lists, and run statistics.
    """
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with Spill(spill_dir) as spill, ExpertObserver(model) as obs:
        for batch in batched(batches, batch_size):
            ids = torch.as_tensor(batch, device=device)
            hidden = model.model(input_ids=ids).last_hidden_state
            p, h = token_confidence(model, hidden, ids)
            for s in obs.slots:
                record_pairs(spill, s)
            spill.confidence(p.cpu().numpy(), h.cpu().numpy())
            if progress:
                progress(ids.numel())
        layers, p_lo, h_lo = saliency_layers([spill], obs.slots)
        return layers, ProfileStats(spill.tokens, time.perf_counter() - t0, p_lo, h_lo)


@torch.no_grad()
def profile_streamed(
    engine: StreamedModel,
    batches: Sequence[np.ndarray],
    *,
    spill_dir: str | None = None,
    progress: Callable[[int], None] | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> tuple[dict[int, dict[str, tuple[float, ...]]], ProfileStats]:
    """Profile with the layer-streamed engine; same results as :func:`profile_model`.

    ``batches`` are ``[B, T]`` id arrays (see :func:`batched`); ``on_layer(done, total)`` is
    called after each decoder layer.
    """
    t0 = time.perf_counter()
    with Spill(spill_dir) as spill, ExpertObserver(engine.model, device=engine.device) as obs:
        observe_streamed(engine, batches, spill, obs, progress=progress, on_layer=on_layer)
        layers, p_lo, h_lo = saliency_layers([spill], obs.slots)
        return layers, ProfileStats(spill.tokens, time.perf_counter() - t0, p_lo, h_lo, engine.stats.to_json())


def use_streamed(ckpt: Checkpoint, dtype: torch.dtype, device: str, streamed: bool | None,
                 gpu_memory: int | None) -> bool:
    """``streamed`` when given; else streamed when the source is not local (from_pretrained reads
    local folders only) or the model does not fit the device."""
    if not ckpt.storage.is_local:
        if streamed is False:
            raise RewriterError(f"{ckpt.url}: a remote model can only be run streamed (transformers loads "
                                f"local folders); drop --no-streamed, or download it first")
        return True
    if streamed is not None:
        return streamed
    ok, need, free = fits(ckpt, dtype, device, gpu_memory)
    if not ok:
        log.info("%s needs %.1f GiB as %s, %s has %.1f GiB: streaming layers", ckpt.url, need / 2**30,
                 dtype, device, free / 2**30)
    return not ok


def tokenizer_dir(ckpt: Checkpoint, work: Path) -> str:
    """A local folder with the checkpoint's tokenizer files (copied when the source is remote)."""
    if ckpt.storage.is_local:
        return ckpt.storage.root
    for name in ckpt.files:
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and "/" not in name:
            (work / name).write_bytes(ckpt.storage.read_all(name))
    return str(work)


def open_moe(model_path: str, storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """The checkpoint, refused (one clear error) before any weight is read when it is not a
    supported MoE family."""
    ckpt = Checkpoint.open(model_path, storage_options)
    try:
        _ = ckpt.layout
    except BaseException:
        ckpt.storage.close()
        raise
    return ckpt


def eos_of(config: dict[str, Any]) -> int | None:
    eos, vocab = config.get("eos_token_id"), config.get("vocab_size")
    return eos if isinstance(eos, int) and isinstance(vocab, int) and eos < vocab else None


def profile(
    model_path: str,
    data: Sequence[str],
    *,
    domain: str = "default",
    seq_len: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    streamed: bool | None = None,
    gpu_memory: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    expert_chunk: int | None = None,
    devices: Sequence[str] | None = None,
) -> Saliency:
    """Profile ``model_path`` on ``data`` and return the saliency (one domain).

    Args:
        dtype: compute dtype; default the checkpoint's own (MXFP4 experts: bf16).
        streamed: force (True) or forbid (False) the layer-streamed engine; default: streamed
            when the model does not fit the device (or ``gpu_memory`` bytes) or is remote.
        expert_chunk: tokens per layer-batched MoE forward of the streamed engine (None: from
            the memory budget; 0: batch by batch).
        devices: several devices (from :func:`profiling.devices.parse_devices`) to split the
            batches across, one process each, streamed; replaces ``device``.
    """
    streamed = streamed_with(devices, streamed)
    devices = device_list(devices, device, streamed)
    device = devices[0]
    check_device(device)
    ckpt = open_moe(model_path, storage_options)
    try:
        return _profile_open(ckpt, data, domain=domain, seq_len=seq_len, max_tokens=max_tokens,
                             batch_size=batch_size, device=device, dtype=dtype,
                             streamed=streamed, gpu_memory=gpu_memory,
                             progress=progress, on_layer=on_layer,
                             engine=dict(expert_chunk=expert_chunk, devices=devices,
                                         storage_options=storage_options or {}))
    finally:
        ckpt.storage.close()


def _run_streamed(ckpt: Checkpoint, batches: list[np.ndarray], dtype: torch.dtype, gpu_memory: int | None,
                  progress: Callable[[int], None] | None, on_layer: Callable[[int, int], None] | None, *,
                  expert_chunk: int | None, devices: list[str], storage_options: dict[str, Any]):
    """The streamed engine over ``batches`` on one device, or split across ``devices``."""
    if len(devices) == 1:
        engine = StreamedModel(ckpt, device=devices[0], dtype=dtype, gpu_memory=gpu_memory, expert_chunk=expert_chunk)
        return profile_streamed(engine, batches, progress=progress, on_layer=on_layer)
    from profiling.collect import profile_devices
    from profiling.devices import Job

    jobs = [Job(ckpt.url, storage_options, d, str(dtype).removeprefix("torch."), gpu_memory, expert_chunk)
            for d in devices]
    layers, stats = profile_devices(jobs, batches)
    if progress:
        progress(stats.tokens)
    return layers, stats


def _profile_open(ckpt: Checkpoint, data: Sequence[str], *, domain: str, seq_len: int, max_tokens: int | None,
                  batch_size: int, device: str, dtype: torch.dtype | None, streamed: bool | None,
                  gpu_memory: int | None, progress: Callable[[int], None] | None,
                  on_layer: Callable[[int, int], None] | None, engine: dict[str, Any]) -> Saliency:
    model_path = ckpt.url
    with tempfile.TemporaryDirectory(prefix="rewriter-tok-") as work_dir:
        work = Path(work_dir)
        cfg = ckpt.config
        dtype = dtype or checkpoint_dtype(ckpt)
        stream = use_streamed(ckpt, dtype, device, streamed, gpu_memory)
        vocab = int(cfg["vocab_size"])
        tok = LazyTokenizer(tokenizer_dir(ckpt, work), vocab)
        docs = documents(data, tok, vocab)
        attention = ""
        try:  # a data error leaves the file open in the suspended generator until closed
            seqs = pack(docs, seq_len, max_tokens, eos_of(cfg))
            if stream:
                layers, stats = _run_streamed(ckpt, list(batched(seqs, batch_size)), dtype, gpu_memory, progress,
                                              on_layer, **engine)
            else:
                model = load_model(model_path, device, dtype)
                layers, stats = profile_model(model, seqs, batch_size=batch_size, progress=progress)
                attention = str(model.config._attn_implementation)
        finally:
            docs.close()
        method = {"seq_len": seq_len, "batch_size": batch_size, "device": device, "devices": engine["devices"],
                  "dtype": str(dtype).removeprefix("torch."),
                  "streamed": stream, "data": [str(d) for d in data],
                  "eaft": {"p_quantile": P_QUANTILE, "h_quantile": H_QUANTILE, "p_lo": stats.p_lo, "h_lo": stats.h_lo,
                           "top_entropy": TOP_ENTROPY},
                  "seconds": stats.seconds}
        if stats.engine is not None:
            method["engine"] = stats.engine
            attention = stats.engine.get("attention", "")
        method["attention"] = attention  # kernels round differently: saliency of two differs slightly
        return Saliency(
            domain=domain,
            layers=layers,
            tokens=stats.tokens,
            model={**model_identity(ckpt), "name": str(model_path)},
            method=method,
        )
