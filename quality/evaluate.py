"""Teacher-forced evaluation of a causal LM on packed blocks of text packs.

The model is loaded whole on one device, or run by the layer-streamed engine
(:mod:`profiling.streamed`) when it does not fit (or ``streamed=True``): then every pack's blocks
of one sequence length go through one pass over the layers.

Per pack (and the union of all packs) and sequence length: perplexity, mean probability of the
reference token, mean normalized top-20 entropy, the confident-conflict rate, and the 20 x 20
histogram of (probability, entropy). With a base model the confident-conflict thresholds are the
base's 15th percentiles on the same tokens, and :mod:`quality.gates` decides near-losslessness.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.checkpoint import Checkpoint
from core.errors import RewriterError
from profiling import devices as multidevice
from profiling.data import LazyTokenizer, block_prefix, documents, pack
from profiling.devices import Job
from profiling.profile import (
    TOP_ENTROPY,
    batched,
    eos_of,
    load_model,
    reference_scores,
    tokenizer_dir,
    use_streamed,
)
from profiling.streamed import StreamedModel, check_device
from profiling.weights import checkpoint_dtype
from quality.gates import Gates, check, histogram

UNION = "union"
log = logging.getLogger(__name__)


@dataclass
class Tokens:
    """Per-token arrays of one (pack, seq-len): log-probability of the reference, and entropy."""

    logp: np.ndarray
    h: np.ndarray


def load_blocks(tokenizer_path: str, packs: Sequence[str], seq_len: int, blocks: int | None, vocab: int,
                eos: int | None) -> dict[str, list[np.ndarray]]:
    """Packed blocks per pack (named by file stem), at most ``blocks`` each. Each block starts as
    the tokenizer starts a text (its BOS where it adds one, as lm-eval-harness does); the prefix
    is context, never a scored token (docs/eval.md)."""
    tok = LazyTokenizer(tokenizer_path, vocab)
    out = {}
    for p in packs:
        limit = None if blocks is None else blocks * seq_len
        docs = documents([p], tok, vocab)
        try:
            prefix = block_prefix(tok) if _has_text(p) else []
            out[Path(p).stem] = list(pack(docs, seq_len, limit, eos, prefix))
        finally:
            docs.close()  # pack stops early: close the file now, not when collected
    return out


def _has_text(path: str) -> bool:
    """Whether a pack is text the tokenizer encodes (not ``.npy`` or ``input_ids`` lines, which
    are used as given and need no tokenizer)."""
    p = Path(path)
    if p.suffix == ".npy":
        return False
    if p.suffix != ".jsonl":
        return True
    with open(p, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    return '"input_ids"' not in first


@torch.no_grad()
def score(model, blocks: list[np.ndarray], batch_size: int = 8) -> Tokens:
    """Log-probability of each next token and its normalized top-20 entropy."""
    device = next(model.parameters()).device
    logps, hs = [], []
    for i in range(0, len(blocks), batch_size):
        group = blocks[i : i + batch_size]
        lengths = {len(b) for b in group}
        for sub in ([group] if len(lengths) == 1 else [[b] for b in group]):
            ids = torch.as_tensor(np.stack(sub), device=device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            ref = ids[:, 1:]
            logp = torch.log_softmax(logits, -1)
            logps.append(logp.gather(-1, ref[..., None])[..., 0].reshape(-1).cpu().numpy())
            top = torch.topk(logits, min(TOP_ENTROPY, logits.shape[-1]), dim=-1).values
            q = torch.softmax(top, -1)
            hs.append((-(q * torch.log(q.clamp_min(1e-30))).sum(-1) / math.log(TOP_ENTROPY)).reshape(-1).cpu().numpy())
    return Tokens(np.concatenate(logps).astype(np.float64), np.concatenate(hs).astype(np.float64))


def _batches(data: dict[str, list[np.ndarray]], batch_size: int) -> tuple[list[np.ndarray], list[str]]:
    """Every pack's blocks in batches, and the pack each batch belongs to."""
    batches, owners = [], []
    for name, blocks in data.items():
        for b in batched(blocks, batch_size):
            batches.append(b)
            owners.append(name)
    return batches, owners


def score_batches(engine: StreamedModel, batches: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per batch, the scored positions' log-probabilities and entropies, in one streamed pass."""
    def head(hidden: torch.Tensor, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logp, h = reference_scores(engine.model.get_output_embeddings(), hidden, ids)
        t = ids.shape[1]
        return (logp.view(-1, t)[:, :-1].reshape(-1).cpu().numpy(), h.view(-1, t)[:, :-1].reshape(-1).cpu().numpy())

    return engine.run(batches, head)


def score_share(job: Job, batches: Sequence[np.ndarray]) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """One device's :func:`score_batches` (run in its own process) and its engine measurements."""
    ckpt, engine = multidevice.engine(job)
    try:
        return score_batches(engine, batches), engine.stats.to_json()
    finally:
        ckpt.storage.close()


class SplitScorer:
    """Scores packs with the batches split across several devices (:mod:`profiling.devices`);
    per-token scores come back in batch order, so every sum over them is one device's."""

    def __init__(self, jobs: Sequence[Job], batch_size: int):
        self.jobs, self.batch_size = list(jobs), batch_size
        self.stats: dict[str, Any] | None = None

    def __call__(self, data: dict[str, list[np.ndarray]]) -> dict[str, Tokens]:
        batches, owners = _batches(data, self.batch_size)
        work = [(j, p) for j, p in zip(self.jobs, multidevice.split(batches, len(self.jobs))) if p]
        parts = multidevice.run_all(score_share, [j for j, _ in work], [(p,) for _, p in work])
        self.stats = multidevice.merged_engine([j.device for j, _ in work], [st for _, st in parts])
        return _assemble([r for rs, _ in parts for r in rs], owners, data)


def score_streamed(engine: StreamedModel, data: dict[str, list[np.ndarray]], batch_size: int = 8) -> dict[str, Tokens]:
    """:func:`score` of every pack in one streamed pass over the model's layers."""
    batches, owners = _batches(data, batch_size)
    return _assemble(score_batches(engine, batches), owners, data)


def _assemble(results: list[tuple[np.ndarray, np.ndarray]], owners: list[str],
              data: dict[str, list[np.ndarray]]) -> dict[str, Tokens]:
    out = {}
    for name in data:
        mine = [r for r, o in zip(results, owners) if o == name]
        out[name] = Tokens(np.concatenate([r[0] for r in mine]).astype(np.float64),
                           np.concatenate([r[1] for r in mine]).astype(np.float64))
    return out


@dataclass
class Subject:
    """A model under evaluation: its config, where its tokenizer is, and how it scores packs."""

    config: dict[str, Any]
    tokenizer_dir: str
    score: Callable[[dict[str, list[np.ndarray]]], dict[str, Tokens]]
    engine: StreamedModel | None = None  # the streamed engine, when the model is streamed
    split: SplitScorer | None = None  # the scorer, when the batches are split across devices

    def engine_stats(self) -> dict[str, Any] | None:
        """Measurements of the model's last streamed pass (None when run whole)."""
        if self.split is not None:
            return self.split.stats
        return None if self.engine is None else self.engine.stats.to_json()


def loaded_subject(model, path: str, batch_size: int) -> Subject:
    return Subject(model.config.to_dict(), path, lambda data: {n: score(model, b, batch_size) for n, b in data.items()})


def open_subject(path: str, stack: contextlib.ExitStack, *, device: str, dtype: torch.dtype | None,
                 streamed: bool | None, gpu_memory: int | None, storage_options: dict[str, Any] | None,
                 batch_size: int, expert_chunk: int | None = None, devices: Sequence[str] = ()) -> Subject:
    """Open ``path`` (headers only) and choose the whole-model or streamed path for it (always
    streamed, split across them, with several ``devices``)."""
    ckpt = Checkpoint.open(path, storage_options)
    stack.callback(ckpt.storage.close)
    dtype = dtype or checkpoint_dtype(ckpt)
    work = stack.enter_context(tempfile.TemporaryDirectory(prefix="rewriter-tok-"))
    tok = tokenizer_dir(ckpt, Path(work))
    if len(devices) > 1:
        jobs = [Job(path, storage_options or {}, d, str(dtype).removeprefix("torch."), gpu_memory, expert_chunk)
                for d in devices]
        scorer = SplitScorer(jobs, batch_size)
        return Subject(ckpt.config, tok, scorer, split=scorer)
    if not use_streamed(ckpt, dtype, device, streamed, gpu_memory):
        return loaded_subject(load_model(path, device, dtype), tok, batch_size)
    engine = StreamedModel(ckpt, device=device, dtype=dtype, gpu_memory=gpu_memory, expert_chunk=expert_chunk)
    return Subject(ckpt.config, tok, lambda data: score_streamed(engine, data, batch_size), engine)


def summarize(t: Tokens, p_lo: float, h_lo: float) -> dict[str, Any]:
    p = np.exp(t.logp)
    return {
        "tokens": int(t.logp.size),
        "ppl": float(np.exp(-t.logp.mean())),
        "mean_p": float(p.mean()),
        "mean_entropy": float(t.h.mean()),
        "cc_rate": float(np.mean((p < p_lo) & (t.h < h_lo))),
        "p_lo": p_lo,
        "h_lo": h_lo,
        "hist": histogram(p, t.h).tolist(),
    }


def thresholds(t: Tokens) -> tuple[float, float]:
    return float(np.percentile(np.exp(t.logp), 15)), float(np.percentile(t.h, 15))


def evaluate(
    model_path: str,
    packs: Sequence[str],
    *,
    seq_lens: Sequence[int] = (1024,),
    blocks: int | None = 16,
    compare: str | None = None,
    device: str = "cpu",
    gates: Gates | None = None,
    batch_size: int = 8,
    model=None,
    base_model=None,
    base_cache: dict | None = None,
    dtype: torch.dtype | None = None,
    streamed: bool | None = None,
    gpu_memory: int | None = None,
    storage_options: dict[str, Any] | None = None,
    expert_chunk: int | None = None,
    devices: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model_path`` (and ``compare``, the base) on ``packs``.

    ``model``/``base_model`` may be given already loaded; ``base_cache`` keeps the base's token
    scores between calls (the quality benchmark evaluates many pruned models against one base).
    ``dtype``, ``streamed`` and ``gpu_memory`` choose how models that are not given are run
    (defaults: the checkpoint's dtype; streamed when the model does not fit the device);
    ``expert_chunk`` the streamed engine's layer-batched MoE (tokens; 0: batch by batch), and
    ``devices`` several devices to split the batches across (streamed, one process each).

    Returns:
        ``{"rows": [...], "pass": bool | None, "gates": {...}}``; one row per (pack, seq-len),
        the union last, each with the model's summary and, with a base, ``base`` and ``check``.
    """
    gates = gates or Gates()
    streamed = multidevice.streamed_with(devices, streamed)
    devices = multidevice.device_list(devices, device, streamed)
    device = devices[0]
    check_device(device)
    opts = dict(device=device, dtype=dtype, streamed=streamed, gpu_memory=gpu_memory,
                storage_options=storage_options, batch_size=batch_size, expert_chunk=expert_chunk, devices=devices)
    with contextlib.ExitStack() as stack:
        subject = (loaded_subject(model, model_path, batch_size) if model is not None
                   else open_subject(model_path, stack, **opts))
        base: Subject | None = None
        if compare is not None and base_model is not None:
            base = loaded_subject(base_model, compare, batch_size)
        cfg = subject.config
        rows = []
        for seq_len in seq_lens:
            data = load_blocks(subject.tokenizer_dir, packs, seq_len, blocks, int(cfg["vocab_size"]), eos_of(cfg))
            scored = _with_union(subject.score(data))
            base_scored: dict[str, Tokens] = {}
            if compare is not None:
                key = (compare, seq_len, tuple(packs), blocks)
                if base_cache is not None and key in base_cache:
                    base_scored = base_cache[key]
                else:
                    base = base or open_subject(compare, stack, **opts)
                    _check_comparable(cfg, base.config, model_path, compare)
                    base_scored = _with_union(base.score(data))
                    if base_cache is not None:
                        base_cache[key] = base_scored
            rows += _rows(scored, base_scored, seq_len, compare is not None, gates)
    verdict = all(r["check"]["pass"] for r in rows) if compare is not None else None
    result = {"model": model_path, "base": compare, "rows": rows, "pass": verdict, "gates": gates.to_json()}
    if subject.engine_stats() is not None:  # measurements of the model's last streamed pass
        result["engine"] = subject.engine_stats()
    return result


def _check_comparable(cfg: dict[str, Any], base_cfg: dict[str, Any], model_path: str, compare: str) -> None:
    """Perplexities are comparable only over one tokenizer: a base with another vocabulary is
    refused; one of another family is compared with a warning."""
    if cfg.get("vocab_size") != base_cfg.get("vocab_size"):
        raise RewriterError(
            f"--compare {compare} has a vocabulary of {base_cfg.get('vocab_size')} tokens and {model_path} "
            f"of {cfg.get('vocab_size')}: their perplexities cannot be compared; compare a pruned model "
            f"with the model it was pruned from")
    if cfg.get("model_type") != base_cfg.get("model_type"):
        log.warning("--compare %s is a %s model and %s a %s model; the gates assume a model and the "
                    "checkpoint it was pruned from", compare, base_cfg.get("model_type"), model_path,
                    cfg.get("model_type"))


def _with_union(scored: dict[str, Tokens]) -> dict[str, Tokens]:
    union = Tokens(np.concatenate([t.logp for t in scored.values()]), np.concatenate([t.h for t in scored.values()]))
    return {**scored, UNION: union}


def _rows(scored: dict[str, Tokens], base_scored: dict[str, Tokens], seq_len: int, compare: bool,
          gates: Gates) -> list[dict[str, Any]]:
    rows = []
    for name, t in scored.items():
        ref = base_scored.get(name, t)
        p_lo, h_lo = thresholds(ref)
        row: dict[str, Any] = {"pack": name, "seq_len": seq_len, **summarize(t, p_lo, h_lo)}
        if compare:
            row["base"] = summarize(ref, p_lo, h_lo)
            row["check"] = check(row["base"], row, gates)
        rows.append(row)
    return rows


def format_table(result: dict[str, Any]) -> str:
    has_base = result["base"] is not None
    head = ["pack", "seq", "tokens", "ppl", "mean p", "entropy", "cc rate"]
    if has_base:
        head += ["Δppl", "Δp", "Δcc", "JSD", "gates"]
    rows = [head]
    for r in result["rows"]:
        row = [r["pack"], str(r["seq_len"]), str(r["tokens"]), f"{r['ppl']:.3f}", f"{r['mean_p']:.4f}",
               f"{r['mean_entropy']:.4f}", f"{r['cc_rate']:.4f}"]
        if has_base:
            c = r["check"]
            failed = [g for g in ("ppl", "mean_p", "cc", "jsd") if not c[f"pass_{g}"]]
            row += [f"{c['d_ppl']:+.3f}", f"{c['d_mean_p']:+.4f}", f"{c['d_cc_rate']:+.4f}", f"{c['jsd']:.4f}",
                    "pass" if c["pass"] else "FAIL " + ",".join(failed)]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if has_base:
        lines.append("")
        g = result["gates"]
        lines.append(f"near-lossless: {'PASS' if result['pass'] else 'FAIL'} (gates: Δppl <= max({g['ppl_abs']:g}, "
                     f"{g['ppl_rel']:g} x base ppl), |Δp| <= {g['mean_p']:g}, |Δcc| <= {g['cc']:g}, "
                     f"JSD <= {g['jsd']:g})")
    return "\n".join(lines)


def plot_histograms(result: dict[str, Any], path: str) -> None:
    """Base vs pruned (probability, entropy) histograms of the union at the first sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = next(r for r in result["rows"] if r["pack"] == UNION)
    panels = [("pruned" if result["base"] else "model", row["hist"])]
    if result["base"]:
        panels.insert(0, ("base", row["base"]["hist"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (title, hist) in zip(axes[0], panels):
        h = np.asarray(hist)
        im = ax.imshow(np.log1p(h.T), origin="lower", extent=(0, 1, 0, 1), aspect="auto", cmap="viridis")
        ax.set_xlabel("probability of the reference token")
        ax.set_ylabel("top-20 entropy / ln 20")
        ax.set_title(f"{title} ({row['tokens']} tokens, seq {row['seq_len']})")
        fig.colorbar(im, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
