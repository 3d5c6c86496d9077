"""Teacher-forced evaluation of a causal LM on packed blocks of text packs.

Per pack (and the union of all packs) and sequence length: perplexity, mean probability of the
reference token, mean normalized top-20 entropy, the confident-conflict rate, and the 20 x 20
histogram of (probability, entropy). With a base model the confident-conflict thresholds are the
base's 15th percentiles on the same tokens, and :mod:`quality.gates` decides near-losslessness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from profiling.data import LazyTokenizer, documents, pack
from profiling.profile import TOP_ENTROPY, load_model
from quality.gates import Gates, check, histogram

UNION = "union"


@dataclass
class Tokens:
    """Per-token arrays of one (pack, seq-len): log-probability of the reference, and entropy."""

    logp: np.ndarray
    h: np.ndarray


def load_blocks(model_path: str, packs: Sequence[str], seq_len: int, blocks: int | None, vocab: int,
                eos: int | None) -> dict[str, list[np.ndarray]]:
    """Packed blocks per pack (named by file stem), at most ``blocks`` each."""
    tok = LazyTokenizer(model_path, vocab)
    out = {}
    for p in packs:
        limit = None if blocks is None else blocks * seq_len
        out[Path(p).stem] = list(pack(documents([p], tok), seq_len, limit, eos, vocab))
    return out


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
) -> dict[str, Any]:
    """Evaluate ``model_path`` (and ``compare``, the base) on ``packs``.

    ``model``/``base_model`` may be given already loaded; ``base_cache`` keeps the base's token
    scores between calls (the quality benchmark evaluates many pruned models against one base).

    Returns:
        ``{"rows": [...], "pass": bool | None, "gates": {...}}``; one row per (pack, seq-len),
        the union last, each with the model's summary and, with a base, ``base`` and ``check``.
    """
    gates = gates or Gates()
    model = model if model is not None else load_model(model_path, device)
    cfg = model.config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) and cfg.eos_token_id < cfg.vocab_size else None
    if compare is not None and base_model is None and (base_cache is None or not base_cache):
        base_model = load_model(compare, device)
    rows = []
    for seq_len in seq_lens:
        data = load_blocks(model_path, packs, seq_len, blocks, cfg.vocab_size, eos)
        scored = {name: score(model, b, batch_size) for name, b in data.items()}
        scored[UNION] = Tokens(np.concatenate([t.logp for t in scored.values()]),
                               np.concatenate([t.h for t in scored.values()]))
        base_scored: dict[str, Tokens] = {}
        if compare is not None:
            key = (compare, seq_len, tuple(packs), blocks)
            if base_cache is not None and key in base_cache:
                base_scored = base_cache[key]
            else:
                base_scored = {name: score(base_model, b, batch_size) for name, b in data.items()}
                base_scored[UNION] = Tokens(np.concatenate([t.logp for t in base_scored.values()]),
                                            np.concatenate([t.h for t in base_scored.values()]))
                if base_cache is not None:
                    base_cache[key] = base_scored
        for name, t in scored.items():
            ref = base_scored.get(name, t)
            p_lo, h_lo = thresholds(ref)
            row: dict[str, Any] = {"pack": name, "seq_len": seq_len, **summarize(t, p_lo, h_lo)}
            if compare is not None:
                row["base"] = summarize(ref, p_lo, h_lo)
                row["check"] = check(row["base"], row, gates)
            rows.append(row)
    verdict = all(r["check"]["pass"] for r in rows) if compare is not None else None
    return {"model": model_path, "base": compare, "rows": rows, "pass": verdict, "gates": gates.to_json()}


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
        lines.append(f"near-lossless: {'PASS' if result['pass'] else 'FAIL'} (gates: {result['gates']})")
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
