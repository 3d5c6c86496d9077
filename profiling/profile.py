"""``rewriter profile``: expert saliency of a gpt-oss model on calibration text.

One forward pass per batch of packed sequences. Per MoE layer and expert the observer
(:mod:`profiling.observer`) accumulates the routed-token count and the sum of routing weight x
expert output norm (float64); per token the model's probability of the reference (next) token
``p`` and its normalized top-20 entropy ``H`` are computed from the final hidden states in
chunks. EAFT-REAP needs the 15th percentiles of ``p`` and ``H`` over all profiled tokens, so each
batch's per-pair contributions are spilled to disk; after the last batch the exact thresholds
are found by streaming (:func:`profiling.stats.exact_percentile`) and the spill is reduced. RAM
stays bounded by the batch, whatever the number of tokens; disk holds ``6 x k`` bytes per token
and MoE layer.

The last position of each sequence has no reference token: it counts for frequency and REAP,
not for EAFT-REAP (no ``p``, no ``H``).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from planners.saliency import Saliency
from profiling.data import LazyTokenizer, documents, pack
from profiling.observer import ExpertObserver
from profiling.stats import eaft_weights, exact_percentile

TOP_ENTROPY = 20
P_QUANTILE = 15.0
H_QUANTILE = 15.0


def load_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """A causal LM from ``path``; MXFP4 (gpt-oss) checkpoints are dequantized to bf16."""
    import json

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = json.loads((Path(path) / "config.json").read_text())
    kw: dict[str, Any] = {"dtype": dtype}
    if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return model.to(device).eval()


@torch.no_grad()
def token_confidence(model, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int = 2048):
    """Per position: probability of the next token and top-20 entropy / ln 20 (last: NaN)."""
    b, t, _ = hidden.shape
    flat = hidden.reshape(b * t, -1)
    ref = torch.full((b, t), -1, dtype=torch.long, device=input_ids.device)
    ref[:, :-1] = input_ids[:, 1:]
    ref = ref.reshape(-1)
    p = torch.empty(b * t, dtype=torch.float32, device=hidden.device)
    h = torch.empty_like(p)
    for s in range(0, b * t, chunk):
        logits = model.lm_head(flat[s : s + chunk]).float()
        logp = torch.log_softmax(logits, dim=-1)
        r = ref[s : s + chunk]
        p[s : s + chunk] = torch.where(r >= 0, logp.gather(1, r.clamp(min=0)[:, None])[:, 0].exp(),
                                       torch.full_like(r, float("nan"), dtype=torch.float32))
        top = torch.topk(logits, min(TOP_ENTROPY, logits.shape[-1]), dim=-1).values
        q = torch.softmax(top, dim=-1)
        ent = -(q * torch.log(q.clamp_min(1e-30))).sum(-1) / math.log(TOP_ENTROPY)
        h[s : s + chunk] = torch.where(r >= 0, ent, torch.full_like(ent, float("nan")))
    return p, h


@dataclass
class ProfileStats:
    tokens: int
    seconds: float
    p_lo: float
    h_lo: float


@torch.no_grad()
def profile_model(
    model,
    batches: Sequence[np.ndarray] | Any,
    *,
    batch_size: int = 1,
    spill_dir: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[int, dict[str, tuple[float, ...]]], ProfileStats]:
    """Profile ``model`` on packed sequences.

    Returns:
        Per MoE layer ``{"freq", "reap", "eaft_reap"}`` lists, and run statistics.
    """
    device = next(model.parameters()).device
    spill = Path(spill_dir or tempfile.mkdtemp(prefix="rewriter-profile-"))
    spill.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    tokens = 0
    t0 = time.perf_counter()
    with ExpertObserver(model) as obs:
        pending: list[np.ndarray] = []

        def flush() -> None:
            nonlocal tokens
            lengths = {len(x) for x in pending}
            groups = [pending] if len(lengths) == 1 else [[x] for x in pending]
            for grp in groups:
                ids = torch.as_tensor(np.stack(grp), device=device)
                hidden = model.model(input_ids=ids).last_hidden_state
                p, h = token_confidence(model, hidden, ids)
                rec = {"p": p.cpu().numpy(), "h": h.cpu().numpy()}
                for s in obs.slots:
                    rec[f"ids{s.index}"] = s.last_ids.to(torch.int16).cpu().numpy()
                    rec[f"c{s.index}"] = s.last_contrib.cpu().numpy()
                f = spill / f"batch-{len(files):06d}.npz"
                np.savez(f, **rec)
                files.append(f)
                tokens += ids.numel()
                if progress:
                    progress(ids.numel())
            pending.clear()

        for seq in batches:
            pending.append(seq)
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
        freq = {s.index: s.freq.cpu().numpy() for s in obs.slots}
        reap_sum = {s.index: s.reap_sum.cpu().numpy() for s in obs.slots}
        layers = [s.index for s in obs.slots]
    if not files:
        raise ValueError("no calibration tokens")

    def chunks(key: str):
        def it():
            for f in files:
                v = np.load(f)[key]
                yield v[~np.isnan(v)]
        return it

    p_lo = exact_percentile(chunks("p"), P_QUANTILE)
    h_lo = exact_percentile(chunks("h"), H_QUANTILE)
    eaft = {i: np.zeros_like(freq[i]) for i in layers}
    for f in files:
        rec = np.load(f)
        valid = ~np.isnan(rec["p"])
        w = np.where(valid, eaft_weights(np.nan_to_num(rec["p"]), np.nan_to_num(rec["h"]), p_lo, h_lo), 0.0)
        for i in layers:
            contrib = rec[f"c{i}"].astype(np.float64) * w[:, None]
            eaft[i] += np.bincount(rec[f"ids{i}"].ravel().astype(np.int64), weights=contrib.ravel(),
                                   minlength=len(eaft[i]))
    if spill_dir is None:
        shutil.rmtree(spill, ignore_errors=True)
    out = {}
    for i in layers:
        reap = np.divide(reap_sum[i], freq[i], out=np.zeros_like(reap_sum[i]), where=freq[i] > 0)
        out[i] = {"freq": tuple(float(x) for x in freq[i]), "reap": tuple(float(x) for x in reap),
                  "eaft_reap": tuple(float(x) for x in eaft[i])}
    return out, ProfileStats(tokens, time.perf_counter() - t0, p_lo, h_lo)


def profile(
    model_path: str,
    data: Sequence[str],
    *,
    domain: str = "default",
    seq_len: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Saliency:
    """Load ``model_path``, profile it on ``data`` and return the saliency (one domain)."""
    from rewriter.core.layouts import layout_for_config

    model = load_model(model_path, device)
    cfg = model.config
    tok = LazyTokenizer(model_path, cfg.vocab_size)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) and cfg.eos_token_id < cfg.vocab_size else None
    seqs = pack(documents(data, tok), seq_len, max_tokens, eos, cfg.vocab_size)
    layers, stats = profile_model(model, seqs, batch_size=batch_size, progress=progress)
    layout = layout_for_config(cfg.to_dict())
    return Saliency(
        domain=domain,
        layers=layers,
        tokens=stats.tokens,
        model={"family": layout.family if layout else cfg.model_type, "name": str(model_path),
               "num_layers": cfg.num_hidden_layers, "num_experts": len(next(iter(layers.values()))["freq"]),
               "top_k": cfg.num_experts_per_tok},
        method={"seq_len": seq_len, "batch_size": batch_size, "device": device, "data": [str(d) for d in data],
                "eaft": {"p_quantile": P_QUANTILE, "h_quantile": H_QUANTILE, "p_lo": stats.p_lo, "h_lo": stats.h_lo,
                         "top_entropy": TOP_ENTROPY},
                "seconds": stats.seconds},
    )
