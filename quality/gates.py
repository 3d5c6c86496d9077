"""The near-lossless gates: one rule, used by ``rewriter eval`` and the quality benchmark.

A pruned model passes a (pack, sequence length) when, against the base model on the same tokens:

* perplexity rises by at most ``max(ppl_abs, ppl_rel x base perplexity)`` (defaults 0.25 and 5 %);
* the mean probability of the reference token moves by at most ``mean_p`` (0.02);
* the confident-conflict rate (share of tokens with probability below the base's 15th percentile
  and normalized top-20 entropy below the base's 15th percentile) moves by at most ``cc`` (0.002);
* the Jensen-Shannon divergence (base 2) of the 20 x 20 histograms of (probability, entropy)
  is at most ``jsd`` (0.02).

It passes overall when every (pack, sequence length) passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

HIST_BINS = 20


@dataclass(frozen=True)
class Gates:
    ppl_abs: float = 0.25
    ppl_rel: float = 0.05
    mean_p: float = 0.02
    cc: float = 0.002
    jsd: float = 0.02

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def histogram(p: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Counts of (probability, normalized entropy) over a 20 x 20 grid of [0, 1]^2."""
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    counts, _, _ = np.histogram2d(np.clip(p, 0, 1), np.clip(h, 0, 1), bins=[edges, edges])
    return counts


def jsd(a: np.ndarray, b: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two histograms."""
    pa = a.ravel() / max(a.sum(), 1e-300)
    pb = b.ravel() / max(b.sum(), 1e-300)
    m = 0.5 * (pa + pb)

    def kl(x: np.ndarray, y: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / y[nz])))

    return 0.5 * kl(pa, m) + 0.5 * kl(pb, m)


def check(base: dict[str, Any], pruned: dict[str, Any], gates: Gates) -> dict[str, Any]:
    """Deltas and gate results of one (pack, seq-len) row; rows come from :mod:`quality.evaluate`."""
    d_ppl = pruned["ppl"] - base["ppl"]
    d_p = pruned["mean_p"] - base["mean_p"]
    d_cc = pruned["cc_rate"] - base["cc_rate"]
    div = jsd(np.asarray(base["hist"]), np.asarray(pruned["hist"]))
    limit_ppl = max(gates.ppl_abs, gates.ppl_rel * base["ppl"])
    result = {
        "d_ppl": d_ppl, "d_mean_p": d_p, "d_cc_rate": d_cc, "jsd": div, "ppl_limit": limit_ppl,
        "pass_ppl": d_ppl <= limit_ppl,
        "pass_mean_p": abs(d_p) <= gates.mean_p,
        "pass_cc": abs(d_cc) <= gates.cc,
        "pass_jsd": div <= gates.jsd,
    }
    result["pass"] = all(result[k] for k in ("pass_ppl", "pass_mean_p", "pass_cc", "pass_jsd"))
    return result
