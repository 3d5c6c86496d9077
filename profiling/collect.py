"""What a profile collects, and how it is merged: per-token confidence (``p``, ``H``), the
observer's float64 sums per MoE layer, and the spill of routed pairs, reduced to saliency; on one
device, or with the batches split across several (:mod:`profiling.devices`).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from profiling import devices
from profiling.devices import Job
from profiling.observer import ExpertObserver, LayerSlot
from profiling.spill import Spill, thresholds
from profiling.streamed import HEAD_CHUNK, StreamedModel

TOP_ENTROPY = 20
P_QUANTILE = 15.0
H_QUANTILE = 15.0


@torch.no_grad()
def reference_scores(lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, input_ids: torch.Tensor,
                     chunk: int = HEAD_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: log-probability of the next token and top-20 entropy / ln 20 (last: NaN).

    ``hidden`` is ``[B, T, H]`` after the model's final norm; logits are computed ``chunk``
    positions at a time, so memory holds one chunk of logits whatever the vocabulary.
    """
    b, t, _ = hidden.shape
    flat = hidden.reshape(b * t, -1)
    ref = torch.full((b, t), -1, dtype=torch.long, device=input_ids.device)
    ref[:, :-1] = input_ids[:, 1:]
    ref = ref.reshape(-1)
    logp = torch.empty(b * t, dtype=torch.float32, device=hidden.device)
    h = torch.empty_like(logp)
    for s in range(0, b * t, chunk):
        logits = lm_head(flat[s : s + chunk]).float()
        full = torch.log_softmax(logits, dim=-1)
        r = ref[s : s + chunk]
        nan = torch.full_like(r, float("nan"), dtype=torch.float32)
        logp[s : s + chunk] = torch.where(r >= 0, full.gather(1, r.clamp(min=0)[:, None])[:, 0], nan)
        top = torch.topk(logits, min(TOP_ENTROPY, logits.shape[-1]), dim=-1).values
        q = torch.softmax(top, dim=-1)
        ent = -(q * torch.log(q.clamp_min(1e-30))).sum(-1) / math.log(TOP_ENTROPY)
        h[s : s + chunk] = torch.where(r >= 0, ent, nan)
    return logp, h


@dataclass
class ProfileStats:
    tokens: int
    seconds: float
    p_lo: float
    h_lo: float
    engine: dict[str, Any] | None = None  # the streamed engine's measurements


def record_pairs(spill: Spill, slot) -> None:
    spill.pairs(slot.index, slot.last_ids.cpu().numpy(), slot.last_contrib.cpu().numpy())


def saliency_layers(spills: Sequence[Spill], slots: Sequence[LayerSlot]
                     ) -> tuple[dict[int, dict[str, tuple[float, ...]]], float, float]:
    """freq, REAP, EAFT-REAP and the largest expert output norm (``max_act``) per MoE layer, from
    the observer's sums and the spills (one per device; their tokens are taken together)."""
    if sum(s.tokens for s in spills) == 0:
        raise ValueError("no calibration tokens")
    p_lo, h_lo = thresholds(spills, P_QUANTILE, H_QUANTILE)
    out = {}
    for s in slots:
        freq, reap_sum = s.freq.cpu().numpy(), s.reap_sum.cpu().numpy()
        reap = np.divide(reap_sum, freq, out=np.zeros_like(reap_sum), where=freq > 0)
        eaft = sum(spill.eaft(s.index, len(freq), p_lo, h_lo) for spill in spills)
        out[s.index] = {"freq": tuple(float(x) for x in freq), "reap": tuple(float(x) for x in reap),
                        "eaft_reap": tuple(float(x) for x in eaft)}
        if s.max_norm is not None:
            out[s.index]["max_act"] = tuple(float(x) for x in s.max_norm.cpu().numpy())
    return out, p_lo, h_lo


def observe_streamed(engine: StreamedModel, batches: Sequence[np.ndarray], spill: Spill, obs: ExpertObserver, *,
                     progress: Callable[[int], None] | None = None,
                     on_layer: Callable[[int, int], None] | None = None) -> None:
    """``batches`` through the streamed engine with ``obs`` installed: the observer's sums grow,
    every MoE forward's pairs and every token's ``p`` and ``H`` go to ``spill``."""
    slots = {s.index: s for s in obs.slots}

    def after(layer: int, batch: int) -> None:
        if layer in slots:
            record_pairs(spill, slots[layer])

    def head(hidden: torch.Tensor, ids: torch.Tensor) -> None:
        logp, h = reference_scores(engine.model.get_output_embeddings(), hidden, ids)
        spill.confidence(logp.exp().cpu().numpy(), h.cpu().numpy())
        if progress:
            progress(ids.numel())

    engine.run(batches, head, on_layer=after,
               progress=None if on_layer is None else (lambda _stage, done, total: on_layer(done, total)))


def profile_share(job: Job, batches: Sequence[np.ndarray], folder: str) -> dict[str, Any]:
    """One device's profile of its ``batches``: the observer's float64 sums (as arrays), its
    token count and engine measurements; pairs and ``p``/``H`` are left in the spill ``folder``."""
    ckpt, eng = devices.engine(job)
    try:
        with Spill(folder) as spill, ExpertObserver(eng.model, device=eng.device) as obs:
            observe_streamed(eng, batches, spill, obs)
            slots = [(s.index, s.freq.cpu().numpy(), s.reap_sum.cpu().numpy(),
                      None if s.max_norm is None else s.max_norm.cpu().numpy()) for s in obs.slots]
            return {"tokens": spill.tokens, "slots": slots, "engine": eng.stats.to_json()}
    finally:
        ckpt.storage.close()


def merge_slots(parts: Sequence[list[tuple]]) -> list:
    """Per MoE layer, the sums of every device: counts and REAP sums add (float64, in device
    order), maximum norms take the maximum."""
    out = []
    for rows in zip(*parts):
        index = rows[0][0]
        assert all(r[0] == index for r in rows)
        freq = np.sum([r[1] for r in rows], axis=0)
        reap = np.sum([r[2] for r in rows], axis=0)
        top = None if rows[0][3] is None else np.max([r[3] for r in rows], axis=0)
        out.append(LayerSlot(index, torch.from_numpy(freq), torch.from_numpy(reap),
                             None if top is None else torch.from_numpy(top)))
    return out


def profile_devices(jobs: Sequence[Job], batches: Sequence[np.ndarray]):
    """:func:`profiling.profile.profile_streamed` with the batches split across ``jobs``' devices;
    returns the same (layers, stats)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rewriter-profile-") as root:
        work = [(j, p) for j, p in zip(jobs, devices.split(batches, len(jobs))) if p]
        folders = [f"{root}/{i}" for i in range(len(work))]
        results = devices.run_all(profile_share, [j for j, _ in work], [(p, f) for (_, p), f in zip(work, folders)])
        spills = [Spill(f) for f in folders]
        try:
            for spill, r in zip(spills, results):
                spill.tokens = r["tokens"]
            layers, p_lo, h_lo = saliency_layers(spills, merge_slots([r["slots"] for r in results]))
        finally:
            for spill in spills:
                spill.close()
    tokens = sum(r["tokens"] for r in results)
    engine_json = devices.merged_engine([j.device for j, _ in work], [r["engine"] for r in results])
    return layers, ProfileStats(tokens, time.perf_counter() - t0, p_lo, h_lo, engine_json)
