"""Streaming statistics with bounded memory: exact percentiles and EAFT token weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

#: Token weights of EAFT-REAP (FACTS.md): confident and right, confident and wrong, otherwise.
W_RIGHT, W_WRONG, W_OTHER = 1.0, -2.0, 0.25


def eaft_weights(p: np.ndarray, h: np.ndarray, p_lo: float, h_lo: float) -> np.ndarray:
    """+1 where ``p >= p_lo`` and ``h <= h_lo``; -2 where ``p < p_lo`` and ``h <= h_lo``; else 0.25."""
    confident = h <= h_lo
    return np.where(confident, np.where(p >= p_lo, W_RIGHT, W_WRONG), W_OTHER)


def exact_percentile(chunks: Callable[[], Iterable[np.ndarray]], q: float, max_in_memory: int = 1 << 20) -> float:
    """The ``q``-th percentile (numpy's linear interpolation) of values streamed in chunks.

    Memory is bounded by ``max_in_memory`` values plus a fixed histogram, whatever the count:
    each round counts values into 4096 bins and keeps only the bin holding the wanted rank.

    Args:
        chunks: returns a fresh iterator over the value chunks (called once per pass).
        q: percentile in [0, 100].
    """
    n = 0
    lo, hi = np.inf, -np.inf
    for c in chunks():
        if c.size:
            n += c.size
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    if n == 0:
        raise ValueError("no values")
    pos = q / 100.0 * (n - 1)
    k0 = int(np.floor(pos))
    k1 = min(k0 + 1, n - 1)
    v0 = _order_statistic(chunks, k0, lo, hi, max_in_memory)
    v1 = v0 if k1 == k0 else _order_statistic(chunks, k1, lo, hi, max_in_memory)
    return v0 + (pos - k0) * (v1 - v0)


def _order_statistic(chunks: Callable[[], Iterable[np.ndarray]], k: int, lo: float, hi: float, cap: int) -> float:
    """The k-th smallest value (0-based) among the values in [lo, hi]; k counts values >= lo."""
    below = 0  # values < lo seen in earlier rounds are accounted for in k already
    while True:
        if lo == hi:
            return lo
        inside = []
        count = 0
        for c in chunks():
            m = c[(c >= lo) & (c <= hi)]
            count += m.size
            if count <= cap:
                inside.append(m)
        if count <= cap:
            vals = np.sort(np.concatenate(inside)) if inside else np.empty(0)
            return float(vals[k - below])
        edges = np.linspace(lo, hi, 4097)
        hist = np.zeros(4096, dtype=np.int64)
        for c in chunks():
            m = c[(c >= lo) & (c <= hi)]
            hist += np.histogram(m, bins=edges)[0]
        cum = np.cumsum(hist)
        b = int(np.searchsorted(cum, k - below, side="right"))
        below += int(cum[b - 1]) if b > 0 else 0
        new_lo, new_hi = float(edges[b]), float(edges[b + 1])
        # Values equal to the upper edge belong to this bin only for the last bin.
        if b < 4095:
            new_hi = float(np.nextafter(new_hi, -np.inf))
        lo, hi = new_lo, max(new_lo, new_hi)
